"""``deferred-middleware jobs`` against the real databases, as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest

from deferred_middleware._jobs import Finish, Status, StoredResponse, utcnow
from deferred_middleware.store._schema import jobs

from .support import enqueue

pytestmark = pytest.mark.servers


def cli(database_url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "deferred_middleware.cli", "jobs", *args]
    env = {**os.environ, "DEFERRED_DATABASE_URL": database_url}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_list_show_cancel_retry_and_prune(store, database_url):
    done, failed, queued = enqueue(store, "/tiny", 3)
    assert {job.id for job in store.claim("w", 2, 30)} == {done, failed}
    store.write(
        [
            Finish(done, 1, Status.SUCCEEDED, StoredResponse(200, [], b"hello")),
            Finish(failed, 1, Status.FAILED, error="It broke."),
        ]
    )

    listed = json.loads(cli(database_url, "list", "--json").stdout)
    assert {row["id"]: row["status"] for row in listed} == {
        done: "succeeded",
        failed: "failed",
        queued: "queued",
    }
    only_failed = json.loads(cli(database_url, "list", "--status", "failed", "--json").stdout)
    assert [row["id"] for row in only_failed] == [failed]
    assert json.loads(cli(database_url, "list", "--older-than", "1h", "--json").stdout) == []
    table = cli(database_url, "list").stdout
    assert table.splitlines()[0].split()[:3] == ["ID", "STATUS", "ATTEMPTS"]
    assert "It broke." in table

    shown = json.loads(cli(database_url, "show", done, "--json").stdout)
    assert shown["response_status"] == 200
    assert shown["response_bytes"] == 5

    assert cli(database_url, "cancel", queued).stdout.split() == [queued, "canceled"]
    refused = cli(database_url, "cancel", done, check=False)
    assert refused.returncode != 0
    assert "already finished" in refused.stderr

    assert cli(database_url, "retry", failed).stdout.split() == [failed, "queued"]
    assert store.get(failed).status is Status.QUEUED
    assert cli(database_url, "retry", done, check=False).returncode != 0
    missing = cli(database_url, "show", "0" * 32, check=False)
    assert missing.returncode != 0
    assert "no job" in missing.stderr

    with store.engine.begin() as connection:
        connection.execute(
            jobs.update().where(jobs.c.id == done).values(finished_at=utcnow() - timedelta(days=2))
        )
    assert cli(database_url, "prune").stdout.strip() == "pruned 1 job"
    assert store.get(done) is None
    assert store.get(queued) is not None  # canceled just now: kept for its retention time

"""``deferred-middleware jobs`` against the real databases, as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest

from deferred_middleware._jobs import (
    WEBHOOK_FAILED,
    Finish,
    Status,
    StoredResponse,
    WebhookAttempt,
    utcnow,
)
from deferred_middleware.store._schema import jobs

from .support import enqueue, make_job

pytestmark = pytest.mark.servers


def cli(database_url: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "deferred_middleware.cli", "jobs", *args]
    env = {**os.environ, "DEFERRED_DATABASE_URL": database_url}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_list_and_show_name_each_job_s_owner(store, database_url):
    job = make_job(owner="alice@example.com")
    store.insert([job])
    [listed] = json.loads(cli(database_url, "list", "--json").stdout)
    assert (listed["owner"], listed["queue"]) == ("alice@example.com", "default")
    assert "alice@example.com" in cli(database_url, "list").stdout
    assert json.loads(cli(database_url, "show", job.id, "--json").stdout)["owner"] == (
        "alice@example.com"
    )


def test_list_show_cancel_retry_and_prune(store, database_url):
    done, failed, queued = enqueue(store, "/tiny", 3)
    assert {job.id for job in store.claim("w", 2, 30)} == {done, failed}
    store.write(
        [
            Finish(done, 1, Status.SUCCEEDED, StoredResponse(200, [], b"hello")),
            Finish(failed, 1, Status.FAILED, error="It broke.", detail="Traceback (x)\nKeyError"),
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
    assert table.splitlines()[0].split() == [
        *("ID", "STATUS", "QUEUE", "OWNER", "ROUTE", "ATTEMPTS", "AGE", "ERROR")
    ]
    assert "It broke." in table

    shown = json.loads(cli(database_url, "show", done, "--json").stdout)
    assert shown["response_status"] == 200
    assert shown["response_bytes"] == 5
    assert shown["error_detail"] is None
    assert json.loads(cli(database_url, "show", failed, "--json").stdout)["error_detail"] == (
        "Traceback (x)\nKeyError"
    )
    assert cli(database_url, "show", failed).stdout.rstrip().endswith("Traceback (x)\nKeyError")

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


def test_webhook_attempts_are_shown_and_a_delivery_can_be_sent_again(store, database_url):
    job = make_job(callback_url="https://hooks.example.com/done")
    plain = make_job()
    store.insert([job, plain])
    for claimed in store.claim("w", 2, 30):
        store.write([Finish(claimed.id, claimed.attempts, Status.FAILED, error="x")])
    [due] = store.claim_webhooks("d", 1, 30)
    attempt = WebhookAttempt(job.id, 1, utcnow(), due.job.callback_url, 500, None, 12, "d")
    store.record_webhook(attempt, WEBHOOK_FAILED, None)

    shown = json.loads(cli(database_url, "webhooks", job.id, "--json").stdout)
    assert shown["url"] == "https://hooks.example.com/done"
    assert shown["state"] == "failed"
    assert [(a["attempt"], a["status_code"]) for a in shown["attempts"]] == [(1, 500)]
    text = cli(database_url, "webhooks", job.id).stdout
    assert "https://hooks.example.com/done  failed" in text and "500" in text

    assert cli(database_url, "redeliver", job.id).stdout.strip() == f"{job.id} webhook due"
    assert store.get(job.id).webhook_state == "pending"
    refused = cli(database_url, "redeliver", plain.id, check=False)
    assert refused.returncode == 5 and "has no callback" in refused.stderr
    assert "has no callback" in cli(database_url, "webhooks", plain.id, check=False).stderr


def test_no_command_creates_a_job_table_but_migrate(database_url):
    """A wrong folder or URL says so, rather than showing an empty new table."""
    listed = cli(database_url, "list", check=False)
    assert listed.returncode == 6
    assert "no job table at" in listed.stderr
    if database_url.startswith("sqlite"):
        assert not os.path.exists(database_url.removeprefix("sqlite:///"))
    assert "up to date" in cli(database_url, "migrate").stdout
    assert cli(database_url, "list").stdout.strip() == "no jobs"


def test_a_url_that_is_not_one_is_a_clear_error():
    result = cli("jobs.db", "list", check=False)
    assert result.returncode == 1
    assert "is not a database URL" in result.stderr


def with_id(job_id: str, **options):
    job = make_job(**options)
    job.id = job_id
    return job


def test_a_unique_prefix_names_a_job_and_exit_codes_say_what_went_wrong(store, database_url):
    first, second, third = "ab" + "1" * 30, "ab" + "2" * 30, "cd" + "3" * 30
    store.insert([with_id(first), with_id(second), with_id(third, path="/other")])

    shown = json.loads(cli(database_url, "show", "cd", "--json").stdout)
    assert (shown["id"], shown["route"]) == (third, "POST /other")
    assert json.loads(cli(database_url, "show", "AB1", "--json").stdout)["id"] == first

    ambiguous = cli(database_url, "show", "ab", check=False)
    assert ambiguous.returncode == 4
    assert "more than one" in ambiguous.stderr
    missing = cli(database_url, "cancel", "ef", check=False)
    assert missing.returncode == 3
    assert cli(database_url, "show", "not-hex", check=False).returncode == 3

    canceled = json.loads(cli(database_url, "cancel", "ab2", "--json").stdout)
    assert canceled == {"id": second, "status": "canceled"}
    assert cli(database_url, "cancel", "ab2").returncode == 0  # canceled it stays
    [claimed] = store.claim("w", 1, 30)
    store.write([Finish(claimed.id, 1, Status.SUCCEEDED, StoredResponse(200, [], b""))])
    finished = cli(database_url, "cancel", claimed.id[:6], check=False)
    assert finished.returncode == 5
    assert "already finished" in finished.stderr
    assert json.loads(cli(database_url, "retry", "ab2", "--json").stdout) == {
        "id": second,
        "status": "queued",
    }
    assert cli(database_url, "retry", claimed.id[:6], check=False).returncode == 5
    assert json.loads(cli(database_url, "prune", "--json").stdout) == {"pruned": 0}


def test_a_unique_suffix_names_a_job_as_well_as_a_prefix(store, database_url):
    """Jobs accepted together share their leading digits, the time."""
    first, second = "019ac0ffee00" + "7" * 18 + "ab", "019ac0ffee00" + "8" * 18 + "cd"
    store.insert([with_id(first), with_id(second)])
    assert json.loads(cli(database_url, "show", "7AB", "--json").stdout)["id"] == first
    assert json.loads(cli(database_url, "show", "8cd", "--json").stdout)["id"] == second
    same_time = cli(database_url, "show", "019ac0ffee", check=False)
    assert same_time.returncode == 4 and "more than one" in same_time.stderr
    assert cli(database_url, "show", "ef", check=False).returncode == 3
    assert cli(database_url, "show", second, "--json").returncode == 0


def test_a_part_that_starts_one_id_and_ends_another_names_neither(store, database_url):
    first, second = "ab" + "1" * 30, "2" * 30 + "ab"
    store.insert([with_id(first), with_id(second)])
    both = cli(database_url, "cancel", "ab", check=False)
    assert both.returncode == 4
    assert store.get(first).status is Status.QUEUED
    assert store.get(second).status is Status.QUEUED


def test_stats_counts_jobs_per_queue_and_status(store, database_url):
    old = make_job(created_at=utcnow() - timedelta(minutes=10))
    nightly = make_job()
    nightly.queue = "nightly"
    store.insert([old, make_job(), nightly])
    [claimed] = store.claim("w", 1, 30, ["nightly"])
    assert claimed.id == nightly.id

    rows = {row["queue"]: row for row in json.loads(cli(database_url, "stats", "--json").stdout)}
    assert set(rows) == {"default", "nightly"}
    assert (rows["default"]["queued"], rows["default"]["running"]) == (2, 0)
    assert (rows["nightly"]["queued"], rows["nightly"]["running"]) == (0, 1)
    assert 590 < rows["default"]["oldest_queued_seconds"] < 3600
    assert rows["nightly"]["oldest_queued_seconds"] is None
    text = cli(database_url, "stats").stdout
    assert text.splitlines()[0].split()[:3] == ["QUEUE", "QUEUED", "RUNNING"]
    assert "10m" in text


def test_workers_shows_who_holds_running_jobs_and_whose_lease_ran_out(store, database_url):
    assert cli(database_url, "workers").stdout.strip() == "no worker holds a running job"
    store.insert([make_job() for _ in range(3)])
    store.claim("web-1:11", 2, 300)
    store.claim("gone:7", 1, -60)  # a lease that ran out a minute ago: that worker is lost
    rows = json.loads(cli(database_url, "workers", "--json").stdout)
    assert [(r["worker"], r["running"]) for r in rows] == [("gone:7", 1), ("web-1:11", 2)]
    assert rows[0]["lease_seconds_left"] < -55 and 290 < rows[1]["lease_seconds_left"] <= 300
    text = cli(database_url, "workers").stdout.splitlines()
    assert text[0].split() == ["WORKER", "RUNNING", "LEASE"]
    assert text[1].split() == ["gone:7", "1", "lost", "1m", "ago"]
    assert text[2].split()[:3] == ["web-1:11", "2", "4m"]


def test_a_list_that_is_cut_says_so(store, database_url):
    enqueue(store, "/tiny", 3)
    cut = cli(database_url, "list", "--limit", "2", "--json")
    assert len(json.loads(cut.stdout)) == 2
    assert "more match" in cut.stderr
    whole = cli(database_url, "list", "--limit", "3", "--json")
    assert len(json.loads(whole.stdout)) == 3
    assert whole.stderr == ""


def test_migrate_on_its_own_for_deploy_scripts(workdir):
    url = f"sqlite:///{workdir}/deploy.db"
    command = [sys.executable, "-m", "deferred_middleware.cli", "--log-level", "info", "migrate"]
    command.append("--json")
    env = {**os.environ, "DEFERRED_DATABASE_URL": url}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["schema"] == "up to date"
    assert "alembic" not in done.stderr  # info is about jobs, not schema machinery
    assert cli(url, "list", "--json").stdout.strip() == "[]"

"""End to end through the web tier: 10,000 jobs POSTed over HTTP to a
uvicorn process that only enqueues, run by a separate worker process,
timed from the first submit to the last job done. Ours beside huey and
PGQueuer, each behind a Starlette endpoint that enqueues into it."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg

from deferred_middleware._jobs import Status

from ._servers import Server
from .e2e import (
    _wait_until,
    background,
    fresh_postgres_database,
    huey_consumer,
    huey_module,
    running_worker,
)
from .submit import submit


def _timed(base: str, path: str, jobs: int, done: Callable[[int], bool]) -> dict[str, float]:
    """Warm up with one job, then submit ``jobs`` and wait until
    ``done(jobs submitted so far)``."""
    submit(base, path, 1)
    _wait_until(lambda: done(1), 60)
    started = time.monotonic()
    submit(base, path, jobs)
    finished = _wait_until(lambda: done(jobs + 1), 600)
    return {"jobs_per_s": jobs / (finished - started)}


def ours(database_url: str, jobs: int, concurrency: int = 32) -> dict[str, float]:
    """The bench app's deferred route under uvicorn (enqueue only) and
    ``deferred-middleware worker``."""
    with running_worker(database_url, concurrency) as (store, _):
        env = {"DATABASE_URL": database_url, "EXECUTE": "0"}
        with Server("uvicorn", env) as web:
            return _timed(web.base, "/deferred", jobs, lambda n: store.count(Status.SUCCEEDED) >= n)


def huey_sqlite(jobs: int, workers: int = 8) -> dict[str, float]:
    """SqliteHuey's consumer with threads, as huey documents for I/O-bound
    tasks; a sync Starlette endpoint enqueues."""
    with tempfile.TemporaryDirectory() as folder:
        env = {"HUEY_DB": str(Path(folder) / "huey.db"), "PEER": "huey"}
        peer_huey = huey_module(env["HUEY_DB"])
        with (
            background(huey_consumer(workers), env),
            Server("uvicorn", env, app="bench.peer_apps:app") as web,
        ):
            storage = peer_huey.huey.storage
            return _timed(web.base, "/submit", jobs, lambda n: storage.result_store_size() >= n)


def pgqueuer_postgres(jobs: int, batch_size: int = 10) -> dict[str, float]:
    """PGQueuer's ``QueueManager`` in a process of its own (batch size 10, its
    default) and an async Starlette endpoint calling ``Queries.enqueue``. A
    job is done when PGQueuer has removed it from its queue table."""
    conninfo = fresh_postgres_database("bench_pgqueuer_http")
    install = [sys.executable, "-m", "pgqueuer", "--pg-dsn", conninfo, "install"]
    subprocess.run(install, check=True, capture_output=True)
    env = {"PGQUEUER_DSN": conninfo, "PEER": "pgqueuer"}
    worker = [sys.executable, "-m", "bench.peer_apps", str(batch_size)]

    with psycopg.connect(conninfo, autocommit=True) as connection:

        def done(_submitted: int) -> bool:
            return connection.execute("SELECT count(*) FROM pgqueuer").fetchone()[0] == 0

        with background(worker, env), Server("uvicorn", env, app="bench.peer_apps:app") as web:
            return _timed(web.base, "/submit", jobs, done)

"""End to end: jobs/s from the first submit to the last stored result, for
10,000 trivial jobs, ours beside huey, procrastinate and PGQueuer running the
same trivial task on the same machine, and the raw SQL ceiling."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import psycopg

from deferred_middleware._ids import new_job_id
from deferred_middleware._jobs import DEFAULT_QUEUE, Job, Status, StoredRequest, utcnow
from deferred_middleware.store import SQLJobStore
from deferred_middleware.store import _finish as finish
from deferred_middleware.store._claim import claim_binds, claim_statement
from deferred_middleware.store._driver_sql import DriverStatement

from ._servers import spawn

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def fresh_postgres_database(name: str) -> str:
    """An empty database per tool, so no run sees another's tables."""
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as connection:
        connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        connection.execute(f"CREATE DATABASE {name}")
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def _wait_until(check, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("the jobs did not finish in time")
        time.sleep(0.02)
    return time.monotonic()


@contextlib.contextmanager
def running_worker(database_url: str, concurrency: int = 32) -> Iterator[tuple[SQLJobStore, int]]:
    """An empty job table and a ``deferred-middleware worker`` on the bench app,
    stopped (SIGTERM) after the block. Gives the store and the worker's pid."""
    store = _empty_job_table(database_url)
    command = [sys.executable, "-m", "deferred_middleware.cli", "worker"]
    command += ["bench.apps:starlette_app", "--concurrency", str(concurrency)]
    try:
        with background(command, {"DATABASE_URL": database_url}) as worker:
            yield store, worker.pid
    finally:
        store.close()


def _empty_job_table(database_url: str) -> SQLJobStore:
    store = SQLJobStore(database_url)
    store.migrate()
    with store.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM deferred_jobs")
    return store


def ours(database_url: str, jobs: int, concurrency: int = 32) -> dict[str, float]:
    """``deferred-middleware worker`` on the bench app; jobs are stored the
    way the middleware stores accepted requests, in batches of 500."""
    with running_worker(database_url, concurrency) as (store, _):
        _insert(store, 1)  # warm-up: the worker is up once this one is done
        _wait_until(lambda: store.count(Status.SUCCEEDED) == 1, 60)
        started = time.monotonic()
        _insert(store, jobs)
        finished = _wait_until(lambda: store.count(Status.SUCCEEDED) == jobs + 1, 600)
    return {"jobs_per_s": jobs / (finished - started)}


def _insert(store: SQLJobStore, count: int) -> None:
    body = b'{"report": "q3"}'
    jobs = [
        Job(
            id=new_job_id(),
            status=Status.QUEUED,
            created_at=utcnow(),
            request=StoredRequest(
                method="POST",
                path="/deferred",
                body=body,
                headers=[("content-type", "application/json"), ("content-length", "16")],
                server=("bench", 80),
            ),
        )
        for _ in range(count)
    ]
    for start in range(0, count, 500):
        store.insert(jobs[start : start + 500])


def huey_module(path: str) -> ModuleType:
    """bench.peer_huey on a fresh file: its SqliteHuey reads HUEY_DB when
    the module runs, here and in the consumer started after this."""
    os.environ["HUEY_DB"] = path
    import bench.peer_huey

    return importlib.reload(bench.peer_huey)


@contextlib.contextmanager
def background(command: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """A process of the bench's (a worker, a peer's consumer), stopped with
    SIGTERM after the block."""
    process = spawn(command, env)
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=60)


def huey_consumer(workers: int) -> list[str]:
    """huey's own consumer with threads, as huey documents for I/O-bound tasks."""
    command = [sys.executable, "-m", "huey.bin.huey_consumer", "bench.peer_huey.huey"]
    return [*command, "-w", str(workers), "-k", "thread", "-q"]


def huey_sqlite(jobs: int, workers: int = 8) -> dict[str, float]:
    """huey's SqliteHuey with its own consumer (threads), enqueueing one by one
    as its API does."""
    with tempfile.TemporaryDirectory() as folder:
        peer_huey = huey_module(str(Path(folder) / "huey.db"))
        huey = peer_huey.huey
        with background(huey_consumer(workers), {}):
            peer_huey.trivial(0)
            _wait_until(lambda: huey.result_count() >= 1, 60)
            huey.storage.flush_results()
            started = time.monotonic()
            for i in range(jobs):
                peer_huey.trivial(i)
            finished = _wait_until(lambda: huey.result_count() >= jobs, 600)
    return {"jobs_per_s": jobs / (finished - started)}


def procrastinate_postgres(jobs: int, concurrency: int = 32) -> dict[str, float]:
    import procrastinate

    conninfo = fresh_postgres_database("bench_procrastinate")
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=conninfo))

    @app.task(queue="bench", name="trivial")
    async def trivial(n: int) -> int:
        return n

    async def run() -> float:
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
            started = time.monotonic()
            await trivial.batch_defer_async(*({"n": i} for i in range(jobs)))
            await app.run_worker_async(concurrency=concurrency, wait=False, queues=["bench"])
            return time.monotonic() - started

    elapsed = asyncio.run(run())
    return {"jobs_per_s": jobs / elapsed}


def pgqueuer_postgres(jobs: int, batch_size: int = 10) -> dict[str, float]:
    from pgqueuer import PsycopgDriver, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    conninfo = fresh_postgres_database("bench_pgqueuer")
    subprocess.run(
        [sys.executable, "-m", "pgqueuer", "--pg-dsn", conninfo, "install"],
        check=True,
        capture_output=True,
    )

    async def run() -> float:
        connection = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
        driver = PsycopgDriver(connection)
        queries = Queries(driver)
        manager = QueueManager(queries)

        last_done = 0.0

        @manager.entrypoint("trivial")
        async def trivial(job: object) -> None:
            nonlocal last_done
            last_done = time.monotonic()

        started = time.monotonic()
        await queries.enqueue(["trivial"] * jobs, [None] * jobs, [0] * jobs)
        # Timed to its last job: run(drain) returns seconds after that.
        await manager.run(batch_size=batch_size, mode=QueueExecutionMode.drain)
        await connection.close()
        return last_done - started

    elapsed = asyncio.run(run())
    return {"jobs_per_s": jobs / elapsed}


def raw_sqlite(jobs: int, batch: int) -> dict[str, float]:
    """The ceiling: claim and complete with hand-written SQL, nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        connection = sqlite3.connect(str(Path(folder) / "raw.db"), isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("CREATE TABLE q (id INTEGER PRIMARY KEY, status TEXT, result BLOB)")
        connection.execute("CREATE INDEX q_status ON q (status)")
        connection.executemany("INSERT INTO q (status) VALUES ('queued')", [()] * jobs)
        started = time.monotonic()
        while True:
            connection.execute("BEGIN IMMEDIATE")
            ids = [
                r[0]
                for r in connection.execute(
                    "UPDATE q SET status='running' WHERE id IN "
                    "(SELECT id FROM q WHERE status='queued' LIMIT ?) RETURNING id",
                    (batch,),
                )
            ]
            connection.execute("COMMIT")
            if not ids:
                break
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(
                "UPDATE q SET status='done', result=x'6f6b' WHERE id=?", [(i,) for i in ids]
            )
            connection.execute("COMMIT")
        elapsed = time.monotonic() - started
        connection.close()
    return {"jobs_per_s": jobs / elapsed}


def raw_postgres(jobs: int, batch: int) -> dict[str, float]:
    conninfo = fresh_postgres_database("bench_raw")
    with psycopg.connect(conninfo, autocommit=True) as connection:
        connection.execute("CREATE TABLE q (id serial PRIMARY KEY, status text, result bytea)")
        connection.execute("CREATE INDEX q_status ON q (status)")
        connection.execute(
            "INSERT INTO q (status) SELECT 'queued' FROM generate_series(1, %s)", (jobs,)
        )
        started = time.monotonic()
        while True:
            ids = [
                r[0]
                for r in connection.execute(
                    "UPDATE q SET status='running' WHERE id IN (SELECT id FROM q WHERE "
                    "status='queued' LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id",
                    (batch,),
                )
            ]
            if not ids:
                break
            connection.execute("UPDATE q SET status='done', result='ok' WHERE id = ANY(%s)", (ids,))
        elapsed = time.monotonic() - started
    return {"jobs_per_s": jobs / elapsed}


# -- the same ceiling on the job table itself --------------------------------
#
# The raw cycles above claim and complete rows of a three-column table that
# stores nothing of a request or a response. These run the job store's own
# claim and outcome statements on its own table, through the bare driver,
# with nothing else around them: what any worker on that table can reach,
# and so what ours is measured against.

OUTCOME = {
    "status": Status.SUCCEEDED.value,
    "attempt": 1,
    "error": None,
    "error_detail": None,
    "response_status": 200,
    "response_headers": '[["content-type", "application/json"]]',
    "response_body": b'{"ok": true}',
}


def _filled_job_table(
    database_url: str, jobs: int
) -> tuple[SQLJobStore, DriverStatement, DriverStatement]:
    """A job table holding ``jobs`` queued jobs as the bench app stores
    them, and the store's claim and outcome statements compiled for its
    driver (the outcomes as one statement a batch where the store does so)."""
    store = _empty_job_table(database_url)
    _insert(store, jobs)
    dialect = store.engine.dialect
    claim = DriverStatement(claim_statement(store.dialect, 1), dialect)
    ends = finish.as_one_run() if store.dialect.finishes_in_one_run else finish.one_by_one()
    return store, claim, DriverStatement(ends, dialect)


def _claim_parameters(store: SQLJobStore, claim: DriverStatement, batch: int) -> Any:
    now = utcnow()
    expires = now + timedelta(seconds=60)
    return claim.parameters(claim_binds(store.dialect, "raw", batch, [DEFAULT_QUEUE], now, expires))


def raw_table_sqlite(database_url: str, jobs: int, batch: int) -> dict[str, float]:
    """As the store runs them on an SQLite file: the claim in a transaction
    of its own, then the batch's outcomes row by row in another."""
    store, claim, ends = _filled_job_table(database_url, jobs)
    store.close()
    outcome = {f"b_{name}": value for name, value in OUTCOME.items()}
    connection = sqlite3.connect(store.engine.url.database, isolation_level=None)
    connection.execute("PRAGMA synchronous=NORMAL")
    started = time.monotonic()
    while True:
        connection.execute("BEGIN IMMEDIATE")
        ids = [
            row[0] for row in connection.execute(claim.sql, _claim_parameters(store, claim, batch))
        ]
        connection.execute("COMMIT")
        if not ids:
            break
        finished_at = store.dialect.datetime_param(utcnow())
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            ends.sql,
            [
                ends.parameters(outcome | {"b_id": job_id, "b_finished_at": finished_at})
                for job_id in ids
            ],
        )
        connection.execute("COMMIT")
    elapsed = time.monotonic() - started
    connection.close()
    return {"jobs_per_s": jobs / elapsed}


def raw_table_postgres(database_url: str, jobs: int, batch: int) -> dict[str, float]:
    """As the store runs them on PostgreSQL: each statement its own
    transaction, a batch's outcomes one statement."""
    store, claim, ends = _filled_job_table(database_url, jobs)
    store.close()
    conninfo = database_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as connection:
        started = time.monotonic()
        while True:
            parameters = _claim_parameters(store, claim, batch)
            ids = [row[0] for row in connection.execute(claim.sql, parameters)]
            if not ids:
                break
            finished_at = store.dialect.datetime_param(utcnow())
            run = {f"a_{name}": [value] * len(ids) for name, value in OUTCOME.items()}
            run |= {"a_id": ids, "a_finished_at": [finished_at] * len(ids)}
            connection.execute(ends.sql, ends.parameters(run))
        elapsed = time.monotonic() - started
    return {"jobs_per_s": jobs / elapsed}

"""A round of accepts inserted at once, on the event loop's own thread: only
where that costs no wait, and never at the price of a row lost or doubled.
Everywhere else the store declines, having stored nothing, and the writer's
thread stores the round as before."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from deferred_middleware import DeferredMiddleware, deferred
from deferred_middleware.store import SQLJobStore, StoreUnavailable, _accept
from deferred_middleware.store._accept import AT_ONCE_BODIES, CHECKPOINT_PAGES

from .support import make_job

PAGE = 4096
FRAME = PAGE + 24  # a page in the log, with its header
LOG_HEADER = 32


def migrated(url: str, **options: float) -> SQLJobStore:
    store = SQLJobStore(url, **options)  # type: ignore[arg-type]
    store.migrate()
    return store


def database_path(sqlite_url: str) -> str:
    return sqlite_url.removeprefix("sqlite:///")


def stored_ids(sqlite_url: str) -> set[str]:
    """What another connection finds committed."""
    with sqlite3.connect(database_path(sqlite_url)) as other:
        return {row[0] for row in other.execute("SELECT id FROM deferred_jobs")}


def test_a_burst_goes_in_at_once_on_a_file_nobody_else_is_writing(sqlite_url):
    store = migrated(sqlite_url)
    jobs = [make_job(body=f"{n}".encode()) for n in range(3)]
    assert store.insert_at_once(jobs) is True
    assert stored_ids(sqlite_url) == {job.id for job in jobs}  # committed
    stored = store.get(jobs[1].id, request=True)
    assert stored is not None and stored.request is not None
    assert stored.request.body == b"1"
    store.close()


def test_a_file_another_connection_is_writing_declines_at_once_and_stores_nothing(sqlite_url):
    """SQLite's lock is held elsewhere: no wait for it (a waiting insert
    would give up after the lock timeout, unavailable), and the connection
    is sound for the next round."""
    store = migrated(sqlite_url, lock_timeout=5)
    job = make_job()
    holder = sqlite3.connect(database_path(sqlite_url), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        assert store.insert_at_once([job]) is False
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert stored_ids(sqlite_url) == set()
    assert store.insert_at_once([job]) is True
    assert stored_ids(sqlite_url) == {job.id}
    store.close()


def test_another_thread_of_this_process_writing_declines_at_once(sqlite_url):
    store = migrated(sqlite_url)
    job = make_job()
    with store._file.one_writer(1):  # type: ignore[union-attr]
        assert store.insert_at_once([job]) is False
    assert stored_ids(sqlite_url) == set()
    store.close()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("{sqlite_url}?synchronous=full", id="a commit that syncs"),
        pytest.param("{sqlite_url}?synchronous=extra", id="a commit that syncs more"),
        pytest.param("sqlite://", id="an in-memory database"),
    ],
)
def test_only_a_file_whose_commits_do_not_sync_inserts_at_once(sqlite_url, url):
    store = migrated(url.format(sqlite_url=sqlite_url))
    job = make_job()
    assert store.insert_at_once([job]) is False
    assert store.get(job.id) is None
    store.close()


def test_only_an_sqlite_file_inserts_at_once(store, database_url):
    """A database server's commit is a round trip: never on the event loop."""
    job = make_job()
    on_file = database_url.startswith("sqlite")
    assert store.insert_at_once([job]) is on_file
    assert (store.get(job.id) is not None) is on_file


def test_a_burst_with_large_bodies_is_left_to_the_writer_thread(sqlite_url):
    """Writing it would keep the event loop from its other requests."""
    store = migrated(sqlite_url)
    half = AT_ONCE_BODIES // 2
    too_much = [make_job(body=b"x" * half), make_job(body=b"x" * (half + 1))]
    assert store.insert_at_once(too_much) is False
    assert stored_ids(sqlite_url) == set()
    just_enough = [make_job(body=b"x" * half), make_job(body=b"x" * half)]
    assert store.insert_at_once(just_enough) is True
    store.close()


def test_the_connection_inserting_at_once_keeps_its_settings_from_the_pool(sqlite_url):
    """It neither waits for the lock nor checkpoints; the pool's connections
    do both, as before."""
    store = migrated(sqlite_url, lock_timeout=5)
    assert store.insert_at_once([make_job()]) is True
    own = store._at_once_connection().dbapi_connection
    assert own.execute("PRAGMA busy_timeout").fetchone() == (0,)
    assert own.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    in_a_thread = threading.Thread(target=store.insert_at_once, args=([make_job()],))
    in_a_thread.start()
    in_a_thread.join()  # the thread is gone, and its connection with it
    gc.collect()
    with contextlib.ExitStack() as held:
        pooled = [
            held.enter_context(store.engine.connect()).connection.dbapi_connection
            for _ in range(store.engine.pool.checkedin())  # type: ignore[attr-defined]
        ]
        assert pooled
        for driver in pooled:
            assert driver.execute("PRAGMA busy_timeout").fetchone() == (5000,)
            assert driver.execute("PRAGMA wal_autocheckpoint").fetchone() == (1000,)
    assert len(stored_ids(sqlite_url)) == 2
    store.close()


def test_inserts_at_once_leave_the_checkpoint_to_whoever_is_told_it_is_due(sqlite_url):
    """No commit of theirs copies the log into the file (that syncs to
    disk); :meth:`checkpoint` does, when :meth:`checkpoint_due` says so."""
    store = migrated(sqlite_url)
    path = database_path(sqlite_url)
    schema_only = os.stat(path).st_size
    rounds, due = 0, False
    while not due and rounds < CHECKPOINT_PAGES:  # one never due fails rather than hangs
        assert store.insert_at_once([make_job()]) is True
        rounds, due = rounds + 1, store.checkpoint_due()
    assert due and rounds <= CHECKPOINT_PAGES // 4  # about four pages of log a commit
    assert not store.checkpoint_due()  # it starts counting again
    for _ in range(rounds):  # past the thousand pages of SQLite's own checkpoint
        assert store.insert_at_once([make_job()]) is True
    assert (os.stat(f"{path}-wal").st_size - LOG_HEADER) // FRAME > CHECKPOINT_PAGES
    assert os.stat(path).st_size == schema_only  # nothing copied yet
    store.checkpoint()
    assert os.stat(path).st_size > schema_only + 2 * rounds * 400  # the rows are in the file
    assert len(stored_ids(sqlite_url)) == 2 * rounds
    store.close()


def test_an_insert_at_once_during_a_checkpoint_declines(sqlite_url, monkeypatch):
    """The checkpoint holds this process's writes back, so that it reaches
    the end of the log (which the next commit then starts again)."""
    store = migrated(sqlite_url)
    during: list[bool] = []
    checkpoint_on = _accept.checkpoint_on

    def checkpointing(driver: object, mode: str) -> None:
        during.append(store.insert_at_once([make_job()]))
        checkpoint_on(driver, mode)

    monkeypatch.setattr(_accept, "checkpoint_on", checkpointing)
    store.checkpoint()
    assert during == [False]
    assert store.insert_at_once([make_job()]) is True
    store.close()


def test_a_connection_that_failed_inserting_at_once_is_not_used_again(sqlite_url):
    store = migrated(sqlite_url)
    assert store.insert_at_once([make_job()]) is True
    store._at_once_connection().dbapi_connection.execute("PRAGMA query_only=ON")
    failed = make_job()
    with pytest.raises(StoreUnavailable):
        store.insert_at_once([failed])
    job = make_job()
    assert store.insert_at_once([job]) is True  # on a fresh connection
    assert failed.id not in stored_ids(sqlite_url)
    store.close()


def test_a_replaced_file_is_noticed_before_anything_goes_in_at_once(sqlite_url, tmp_path):
    """Then the writer's thread opens the file anew, as for any write."""
    store = migrated(sqlite_url)
    assert store.insert_at_once([make_job()]) is True
    path = Path(database_path(sqlite_url))
    shutil.copy(path, tmp_path / "copy.db")
    os.replace(tmp_path / "copy.db", path)
    with pytest.raises(StoreUnavailable, match="removed or replaced"):
        store.insert_at_once([make_job()])
    assert store.insert_at_once([make_job()]) is False  # lost: the thread's to reopen
    job = make_job()
    store.insert([job])
    assert store.insert_at_once([make_job()]) is True
    assert job.id in stored_ids(sqlite_url)
    store.close()


@deferred
async def report(request: Request) -> PlainTextResponse:
    return PlainTextResponse("done")


@pytest.mark.anyio
async def test_an_accept_while_another_connection_writes_waits_for_its_row(sqlite_url):
    """Declined at once, the round goes to the writer's thread, which
    waits for the lock: the 202 comes once the row is committed."""
    app = Starlette(
        routes=[Route("/report", report, methods=["POST"])],
        middleware=[Middleware(DeferredMiddleware, database_url=sqlite_url, execute=False)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/report")).status_code == 202  # inserted at once
        middleware = app.middleware_stack.app  # type: ignore[union-attr]
        writer = middleware.core.writer
        assert writer._thread is None
        holder = sqlite3.connect(database_path(sqlite_url), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        answer = asyncio.ensure_future(client.post("/report"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while writer._thread is None:  # declined, and handed to the thread
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert not answer.done()  # no 202 before the row
        holder.execute("ROLLBACK")
        holder.close()
        accepted = await asyncio.wait_for(answer, 10)
    assert accepted.status_code == 202
    assert len(stored_ids(sqlite_url)) == 2
    await middleware.shutdown()


@pytest.fixture
def anyio_backend():
    return "asyncio"

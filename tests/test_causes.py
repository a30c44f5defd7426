"""A store that is away is explained once per cause, with the driver's own
words (host, port, file), not once per request or poll."""

from __future__ import annotations

import logging

import pytest

from deferred_middleware._causes import CauseLog
from deferred_middleware._jobs import Status
from deferred_middleware.store import SQLJobStore, StoreUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_each_cause_is_a_warning_once_per_interval(caplog):
    caplog.set_level(logging.DEBUG, "deferred_middleware")
    clock = Clock()
    causes = CauseLog(interval=60, monotonic=clock)
    refused = StoreUnavailable('connection to server at "db", port 5432 failed: refused')
    for _ in range(5):
        causes.warn("claiming", refused)
    assert warnings(caplog) == [f"claiming: {refused}"]
    assert len([r for r in caplog.records if r.levelno == logging.DEBUG]) == 4

    causes.warn("claiming", StoreUnavailable("database is locked"))  # a new cause: said at once
    causes.warn("renewing", refused)  # the same cause elsewhere: said too
    assert warnings(caplog)[1:] == ["claiming: database is locked", f"renewing: {refused}"]

    clock.now += 60
    causes.warn("claiming", refused)
    assert warnings(caplog)[-1] == f"claiming: {refused} (4 more times since)"
    clock.now += 60
    causes.warn("claiming", refused)
    assert warnings(caplog)[-1] == f"claiming: {refused}"


def test_a_cause_without_words_is_named_by_its_type(caplog):
    caplog.set_level(logging.WARNING, "deferred_middleware")
    CauseLog().warn("writing", StoreUnavailable())
    assert warnings(caplog) == ["writing: StoreUnavailable"]


def test_a_server_that_is_not_there_is_named_with_its_host_and_port():
    store = SQLJobStore("postgresql://postgres@127.0.0.1:1/test")
    with pytest.raises(StoreUnavailable) as away:
        store.count(Status.QUEUED)
    assert str(away.value).startswith("OperationalError: ")
    assert "127.0.0.1" in str(away.value) and "port 1" in str(away.value)
    with pytest.raises(StoreUnavailable) as away:
        store.get("0" * 32)  # the hot read's own path
    assert "port 1" in str(away.value)
    store.close()


def test_a_missing_sqlite_folder_is_named(tmp_path):
    store = SQLJobStore(f"sqlite:///{tmp_path}/no/such/folder/jobs.db")
    with pytest.raises(StoreUnavailable) as away:
        store.migrate()
    assert "unable to open database file" in str(away.value)
    store.close()


def test_the_cli_names_the_cause_and_exits_6():
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "deferred_middleware.cli", "jobs", "list"]
    env = {**os.environ, "DEFERRED_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/test"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 6
    assert "the job store is unavailable: OperationalError:" in done.stderr
    assert "port 1" in done.stderr


def test_a_forgotten_cause_is_said_again(caplog):
    caplog.set_level(logging.WARNING, "deferred_middleware")
    causes = CauseLog(interval=60, monotonic=Clock())
    causes.warn("claiming", StoreUnavailable("down"))
    causes.forget()
    causes.warn("claiming", StoreUnavailable("down"))
    assert warnings(caplog) == ["claiming: down", "claiming: down"]


@pytest.mark.parametrize("execute", [True, False], ids=["executing", "enqueue-only"])
def test_a_database_unreachable_at_start_up_is_said_at_once_with_where_and_why(caplog, execute):
    """Even a web tier that only enqueues says so when its lifespan starts,
    before any request, naming the host and port but never the password."""
    import asyncio

    from deferred_middleware import DeferredMiddleware

    from .support import eventually

    caplog.set_level(logging.WARNING, "deferred_middleware")

    async def app(scope, receive, send):
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})

    url = "postgresql://someone:hunter2@127.0.0.1:1/test"
    middleware = DeferredMiddleware(app, database_url=url, execute=execute)

    async def start_up() -> None:
        inbox: asyncio.Queue = asyncio.Queue()
        await inbox.put({"type": "lifespan.startup"})
        outbox: asyncio.Queue = asyncio.Queue()
        task = asyncio.ensure_future(middleware({"type": "lifespan"}, inbox.get, outbox.put))
        assert (await outbox.get())["type"] == "lifespan.startup.complete"
        await asyncio.to_thread(eventually, lambda: _said_at_start_up(caplog), 10)
        await inbox.put({"type": "lifespan.shutdown"})
        await task

    asyncio.run(start_up())
    [line] = _said_at_start_up(caplog)
    assert "postgresql://someone:***@127.0.0.1:1/test" in line
    assert 'connection to server at "127.0.0.1", port 1 failed' in line
    assert "hunter2" not in caplog.text


def _said_at_start_up(caplog) -> list[str]:
    return [line for line in warnings(caplog) if "unreachable at start-up" in line]


def test_a_lost_listen_connection_names_its_cause_once(caplog):
    import threading

    from deferred_middleware.store import NEW_JOBS

    caplog.set_level(logging.DEBUG, "deferred_middleware")
    store = SQLJobStore("postgresql://postgres@127.0.0.1:1/test")
    stopped = threading.Event()
    tries = []

    def heard(payload):
        raise AssertionError("nothing can be heard from a server that is not there")

    original_wait = stopped.wait

    def wait(timeout=None):  # the reconnect pause, counted; three tries, then stop
        tries.append(timeout)
        if len(tries) == 3:
            stopped.set()
        return original_wait(0)

    stopped.wait = wait
    store.listen(NEW_JOBS, heard, stopped)
    said = [line for line in warnings(caplog) if "LISTEN connection" in line]
    assert len(said) == 1 and "port 1 failed" in said[0]
    assert said[0].startswith("LISTEN connection for new jobs lost; reconnecting: OperationalError")

"""The ASGI launcher: replays as tasks on a loop in another thread, a
claimed batch started with one wake-up of that loop."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from deferred_middleware._context import RunningJob, set_current
from deferred_middleware._jobs import NO_RESPONSE, StoredRequest, StoredResponse
from deferred_middleware._policy import raised
from deferred_middleware.runner.asgi import NoResponse, TaskLauncher, _Task, replay_asgi

from .support import eventually

attempt_name: contextvars.ContextVar[str] = contextvars.ContextVar("attempt_name")


class App:
    """Answers each request with the attempt's name from its context; a
    request to /forever waits until cancelled."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        if scope["path"] == "/forever":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": attempt_name.get().encode()})


class Outcomes:
    def __init__(self) -> None:
        self.by_name: dict[str, Any] = {}
        self.lock = threading.Lock()

    def ended_for(self, name: str) -> Any:
        def ended(outcome: Any) -> None:
            with self.lock:
                assert name not in self.by_name, "ended twice"
                self.by_name[name] = outcome

        return ended


def request(path: str = "/job") -> StoredRequest:
    return StoredRequest(method="POST", path=path, body=b"", headers=[])


def context_named(name: str) -> contextvars.Context:
    context = contextvars.copy_context()
    context.run(attempt_name.set, name)
    return context


@pytest.fixture
def launcher() -> Iterator[TaskLauncher]:
    launcher = TaskLauncher(App())  # type: ignore[arg-type]
    launcher.bind_own_loop(None)
    yield launcher
    launcher.close()


def held(loop: asyncio.AbstractEventLoop) -> threading.Event:
    """Keep ``loop`` busy until the event is set: what is launched meanwhile
    waits for its next turn."""
    busy, release = threading.Event(), threading.Event()

    def hold() -> None:
        busy.set()
        release.wait(10)

    loop.call_soon_threadsafe(hold)
    assert busy.wait(10)
    return release


def test_a_batch_launched_meanwhile_wakes_the_loop_once_and_each_runs_in_its_context(
    launcher, monkeypatch
):
    loop = launcher.loop
    assert loop is not None
    release = held(loop)
    wake_ups = []
    call_soon_threadsafe = loop.call_soon_threadsafe

    def counted(*args: Any, **kwargs: Any) -> Any:
        wake_ups.append(args)
        return call_soon_threadsafe(*args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    outcomes = Outcomes()
    names = [f"attempt-{i}" for i in range(10)]
    for name in names:
        launcher.launch(request(), context_named(name), outcomes.ended_for(name))
    release.set()
    eventually(lambda: len(outcomes.by_name) == len(names))
    assert len(wake_ups) == 1
    for name in names:
        assert outcomes.by_name[name] == StoredResponse(200, [], name.encode())
    # The next batch wakes the loop again.
    launcher.launch(request(), context_named("later"), outcomes.ended_for("later"))
    eventually(lambda: "later" in outcomes.by_name)
    assert len(wake_ups) == 2


def test_a_replay_cancelled_before_it_started_never_runs_and_ends_without_an_outcome(launcher):
    loop = launcher.loop
    assert loop is not None
    release = held(loop)
    outcomes = Outcomes()
    task = launcher.launch(request(), context_named("early"), outcomes.ended_for("early"))
    kept = launcher.launch(request(), context_named("kept"), outcomes.ended_for("kept"))
    assert task.cancel() is True
    release.set()
    eventually(lambda: len(outcomes.by_name) == 2)
    assert outcomes.by_name["early"] is None
    assert outcomes.by_name["kept"] == StoredResponse(200, [], b"kept")
    assert launcher.app.calls == 1  # type: ignore[attr-defined]
    assert kept.cancel() is False  # it has ended


def test_a_running_replay_is_cancelled_from_another_thread(launcher):
    outcomes = Outcomes()
    task = launcher.launch(request("/forever"), context_named("long"), outcomes.ended_for("long"))
    eventually(lambda: launcher.app.calls == 1)  # type: ignore[attr-defined]
    assert task.cancel() is True
    assert launcher.app.cancelled.wait(10)  # type: ignore[attr-defined]
    eventually(lambda: "long" in outcomes.by_name)
    assert outcomes.by_name["long"] is None
    assert task.cancel() is False


def test_a_closed_loop_refuses_the_launch_and_keeps_nothing_pending():
    launcher = TaskLauncher(App())  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    loop.close()
    launcher.bind(loop, None)
    outcomes = Outcomes()
    for name in ("first", "second"):  # each refused: nothing waits on a wake-up
        with pytest.raises(RuntimeError):
            launcher.launch(request(), context_named(name), outcomes.ended_for(name))
    assert (
        _Task(loop, outcomes.ended_for("none")).cancel() is False
    )  # a closed loop: nothing to stop
    launcher.bind_own_loop(None)
    launcher.launch(request(), context_named("third"), outcomes.ended_for("third"))
    eventually(lambda: "third" in outcomes.by_name)
    assert set(outcomes.by_name) == {"third"}
    launcher.close()


def test_a_finished_replay_s_handle_keeps_nothing_of_its_attempt_alive(launcher):
    """The executor keeps the handle on its attempt; were the handle to keep
    the callback (which holds the attempt), every attempt would end in a
    reference cycle, left to the garbage collector."""
    outcomes = Outcomes()
    ended = outcomes.ended_for("job")
    kept = weakref.ref(ended)
    gc.disable()
    try:
        task = launcher.launch(request(), context_named("job"), ended)
        del ended
        eventually(lambda: "job" in outcomes.by_name)
        eventually(lambda: task.task is not None and task.task.done())
        assert kept() is None
    finally:
        gc.enable()


def test_a_replay_gives_the_app_the_stored_request_and_gathers_its_whole_response():
    stored = StoredRequest(
        method="PUT",
        path="/reports/7",
        query_string=b"q=1",
        headers=[("content-type", "text/plain"), ("x-caf\u00e9", "cr\u00e8me")],
        body=b"hello",
        scheme="https",
        root_path="/api",
        http_version="2",
        server=("example.org", 443),
        client=("10.0.0.1", 5000),
    )
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["scope"] = scope
        seen["first"] = await receive()
        await send({"type": "http.response.start", "status": 201, "headers": [(b"X-Made", b"Yes")]})
        await send({"type": "http.response.body", "body": b"par", "more_body": True})
        waiting = asyncio.ensure_future(receive())
        for _ in range(5):
            await asyncio.sleep(0)  # turns of the loop: a disconnect would be in by now
        seen["early"] = waiting.done()
        await send({"type": "http.response.body", "more_body": True})  # no body: none
        await send({"type": "http.response.body", "body": b"tial"})
        seen["after"] = await waiting  # the client stays until the response is whole

    state = {"pool": object()}
    response = asyncio.run(replay_asgi(app, stored, state))
    assert response == StoredResponse(201, [("x-made", "Yes")], b"partial")
    scope = seen["scope"]
    assert {key: scope[key] for key in scope if key not in ("asgi", "state")} == {
        "type": "http",
        "http_version": "2",
        "method": "PUT",
        "scheme": "https",
        "path": "/api/reports/7",
        "raw_path": b"/api/reports/7",
        "query_string": b"q=1",
        "root_path": "/api",
        "headers": [
            (b"content-type", b"text/plain"),
            ("x-caf\u00e9".encode("latin-1"), "cr\u00e8me".encode("latin-1")),
        ],
        "server": ("example.org", 443),
        "client": ("10.0.0.1", 5000),
        "extensions": {},
    }
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.4"}
    assert scope["state"] == state and scope["state"] is not state  # a copy per job
    assert seen["first"] == {"type": "http.request", "body": b"hello", "more_body": False}
    assert seen["early"] is False
    assert seen["after"] == {"type": "http.disconnect"}


def test_a_replay_without_state_has_none_and_an_app_that_never_answers_is_told_apart():
    seen: dict[str, Any] = {}

    async def silent(scope: Any, receive: Any, send: Any) -> None:
        seen["scope"] = scope

    with pytest.raises(NoResponse):
        asyncio.run(replay_asgi(silent, request()))
    assert "state" not in seen["scope"]


def test_a_start_without_headers_is_a_response_without_headers():
    async def bare(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    assert asyncio.run(replay_asgi(bare, request())) == StoredResponse(204, [], b"")


def test_an_app_that_answers_nothing_or_raises_ends_its_attempt_with_that_failure(launcher):
    error = ValueError("no report")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/raises":
            raise error

    launcher.app = app  # type: ignore[assignment]
    outcomes = Outcomes()
    for path in ("/silent", "/raises"):
        context = context_named(path)
        context.run(set_current, RunningJob("job" + path, 1, lambda *_: None))
        launcher.launch(request(path), context, outcomes.ended_for(path))
    eventually(lambda: len(outcomes.by_name) == 2)
    assert outcomes.by_name["/silent"] == NO_RESPONSE
    assert outcomes.by_name["/raises"] == raised(error)
    assert "ValueError: no report" in outcomes.by_name["/raises"].detail


def test_an_own_loop_shares_the_state_with_its_jobs_and_is_stopped_on_close():
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["state"] = scope["state"]
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body"})

    launcher = TaskLauncher(app)  # type: ignore[arg-type]
    launcher.bind_own_loop({"pool": "shared"})
    thread = launcher._own_thread
    assert thread is not None and thread.is_alive()
    outcomes = Outcomes()
    launcher.launch(request(), context_named("job"), outcomes.ended_for("job"))
    eventually(lambda: "job" in outcomes.by_name)
    assert seen["state"] == {"pool": "shared"}
    launcher.close()
    assert not thread.is_alive()
    assert launcher.loop is None


def test_a_replay_cancelled_between_its_start_and_its_first_step_still_ends():
    """A task cancelled before its coroutine first runs never enters it:
    the attempt must be told all the same, or it holds its slot forever."""
    app = App()
    launcher = TaskLauncher(app)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    try:
        launcher.bind(loop, None)
        ended = loop.create_future()
        task = launcher.launch(request(), context_named("job"), ended.set_result)
        # Queued behind the launch: it runs once the task exists, before its first step.
        loop.call_soon(task._cancel_on_loop)
        assert loop.run_until_complete(asyncio.wait_for(ended, 10)) is None
        assert app.calls == 0
        assert task.cancel() is False
    finally:
        loop.close()

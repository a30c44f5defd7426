"""Replay a stored request into an ASGI app, as a task on the app's event loop."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
from typing import Any

from asgiref.typing import ASGI3Application as ASGIApp
from asgiref.typing import HTTPScope

from .._context import current_job
from .._jobs import NO_RESPONSE, Outcome, StoredRequest, StoredResponse
from .._policy import raised
from ._dispatch import Ended

logger = logging.getLogger("deferred_middleware")


class NoResponse(Exception):
    pass


def build_scope(request: StoredRequest, state: dict[str, Any] | None) -> HTTPScope:
    path = request.root_path + request.path
    scope: HTTPScope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": request.http_version,
        "method": request.method,
        "scheme": request.scheme,
        "path": path,
        "raw_path": path.encode(),
        "query_string": request.query_string,
        "root_path": request.root_path,
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers],
        "server": request.server,
        "client": request.client,
        "extensions": {},
    }
    if state is not None:
        # The app's lifespan state (pools, clients), as a server would share it.
        scope["state"] = dict(state)  # type: ignore[typeddict-unknown-key]
    return scope


async def replay_asgi(
    app: ASGIApp, request: StoredRequest, state: dict[str, Any] | None = None
) -> StoredResponse:
    """Call the app with the stored request; gather its whole response."""
    response_done = asyncio.Event()
    body_sent = False
    status: int | None = None
    headers: list[tuple[str, str]] = []
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        # Like a client that stays connected until the response is complete.
        await response_done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            headers[:] = [
                (k.decode("latin-1").lower(), v.decode("latin-1"))
                for k, v in message.get("headers", ())
            ]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                response_done.set()

    try:
        await app(build_scope(request, state), receive, send)
    finally:
        response_done.set()
    if status is None:
        raise NoResponse("the app returned without starting a response")
    return StoredResponse(status=status, headers=headers, body=b"".join(chunks))


class TaskLauncher:
    """Replays each request as a task on the app's event loop, bound at start-up."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None
        self.state: dict[str, Any] | None = None
        self._own_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending: list[tuple[_Task, StoredRequest, contextvars.Context]] = []

    def bind(self, loop: asyncio.AbstractEventLoop, state: dict[str, Any] | None) -> None:
        """The loop the app runs on, and its lifespan state for the jobs."""
        self.loop = loop
        self.state = state

    def bind_own_loop(self, state: dict[str, Any] | None) -> None:
        """Run the jobs on an event loop of the launcher's own, in a thread.

        For an app called without a lifespan: nothing says how long the
        caller's loop lives (a test client makes one per request), and a job
        must not die with it."""
        if self._own_thread is not None:
            return
        loop = asyncio.new_event_loop()
        self._own_thread = threading.Thread(
            target=loop.run_forever, name="deferred-jobs-loop", daemon=True
        )
        self._own_thread.start()
        self.bind(loop, state)

    def close(self) -> None:
        """Stop the launcher's own loop, if it has one (after the executor stopped)."""
        thread, loop = self._own_thread, self.loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
        self._own_thread = self.loop = None

    def launch(self, request: StoredRequest, context: contextvars.Context, ended: Ended) -> _Task:
        """Queue the replay for the loop. A claimed batch is launched one by
        one from the claiming thread: the first wakes the loop, the rest ride
        on that wake-up, and the loop starts them all in one callback."""
        loop = self.loop
        if loop is None:
            raise RuntimeError("the task launcher was not bound to an event loop")
        task = _Task(loop, ended)
        launch = (task, request, context)
        with self._lock:
            self._pending.append(launch)
            if len(self._pending) > 1:
                return task  # a wake-up is on its way
            try:
                loop.call_soon_threadsafe(self._start_pending)
            except RuntimeError:  # the loop is closed: nothing will start it
                self._pending.remove(launch)
                raise
        return task

    def _start_pending(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for task, request, context in pending:
            # Created inside ``context``: the task runs in a copy of it.
            task.task = context.run(task.loop.create_task, self._run(request, task))

    async def _run(self, request: StoredRequest, task: _Task) -> None:
        try:
            outcome: Outcome = await replay_asgi(self.app, request, self.state)
        except asyncio.CancelledError:
            task.end(None)
            raise
        except NoResponse:
            logger.error("job %s: the app gave no response", current_job().id)
            outcome = NO_RESPONSE
        except Exception as exception:
            logger.exception("job %s: the handler raised", current_job().id)
            outcome = raised(exception)
        task.end(outcome)


class _Task:
    """A launched replay, as :class:`~._attempt.Running`: cancellable from
    any thread, whether or not its task was created yet. It holds the
    attempt's callback only until the replay ends, so that no attempt is
    left in a reference cycle through its handle."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ended: Ended) -> None:
        self.loop = loop
        self.task: asyncio.Task[None] | None = None
        self._ended: Ended | None = ended

    @property
    def done(self) -> bool:
        return self._ended is None

    def end(self, outcome: Outcome | None) -> None:
        """Tell the attempt, once, on the loop."""
        ended, self._ended = self._ended, None
        if ended is not None:
            ended(outcome)

    def cancel(self) -> bool:
        """False once the replay has ended, as for a finished future."""
        if self.done:
            return False
        try:
            self.loop.call_soon_threadsafe(self._cancel_on_loop)
        except RuntimeError:  # the loop is closed: the task is gone with it
            return False
        return True

    def _cancel_on_loop(self) -> None:
        # Queued after the launch's own wake-up: the task exists by now.
        if self.task is not None and self.task.cancel():
            # Cancelled before its first step, the coroutine never runs to
            # say so: the task's end does.
            self.task.add_done_callback(lambda _: self.end(None))

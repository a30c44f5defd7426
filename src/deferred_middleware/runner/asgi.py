"""Replay a stored request into an ASGI app, as a task on the app's event loop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .._context import RunningJob, reset_current, set_current
from .._jobs import StoredRequest, StoredResponse
from .._service import Failure, Outcome
from ..store import StoreUnavailable
from ._dispatch import Attempt, Dispatcher, timeout_failure
from .wsgi import RAISED

logger = logging.getLogger("deferred_middleware")

ASGIApp = Any


class NoResponse(Exception):
    pass


def build_scope(request: StoredRequest, state: dict[str, Any] | None) -> dict[str, Any]:
    path = request.root_path + request.path
    scope: dict[str, Any] = {
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
        scope["state"] = dict(state)
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
    """Runs each claimed attempt as a task on the given event loop."""

    def __init__(
        self, app: ASGIApp, loop: asyncio.AbstractEventLoop, state: dict[str, Any] | None
    ) -> None:
        self.app = app
        self.loop = loop
        self.state = state
        self.dispatcher: Dispatcher | None = None

    def __call__(self, attempt: Attempt) -> Any:
        return asyncio.run_coroutine_threadsafe(self._run(attempt), self.loop)

    async def _run(self, attempt: Attempt) -> None:
        dispatcher = self.dispatcher
        assert dispatcher is not None
        job = attempt.job
        report = dispatcher.service.progress_reporter(job.id, attempt.number)
        running = RunningJob(job.id, attempt.number, report)
        token = set_current(running)
        try:
            outcome = await self._outcome(attempt)
        except asyncio.CancelledError:
            # Canceled by a user or returned to the queue at shutdown:
            # the table already says what became of the job.
            dispatcher.done(attempt)
            raise
        finally:
            reset_current(token)
        if not attempt.interrupted:
            await self._settle(attempt, outcome)
        dispatcher.done(attempt)

    async def _settle(self, attempt: Attempt, outcome: Outcome) -> None:
        """Wait for the outcome's commit without tying up a thread; only while
        the store is unavailable does a thread keep retrying the write."""
        dispatcher = self.dispatcher
        assert dispatcher is not None
        attempt.settling = True
        try:
            written = dispatcher.service.settle(attempt.job, attempt.number, outcome)
            await asyncio.wrap_future(written)
        except StoreUnavailable:
            await asyncio.get_running_loop().run_in_executor(
                None, dispatcher.settle, attempt, outcome
            )

    async def _outcome(self, attempt: Attempt) -> Outcome:
        job = attempt.job
        assert job.request is not None
        try:
            return await asyncio.wait_for(
                replay_asgi(self.app, job.request, self.state), job.options.timeout
            )
        except asyncio.TimeoutError:
            logger.warning("job %s: attempt %d timed out", job.id, attempt.number)
            return timeout_failure(job)
        except NoResponse:
            logger.error("job %s: the app gave no response", job.id)
            return Failure("The handler returned no response.")
        except Exception:
            logger.exception("job %s: attempt %d raised", job.id, attempt.number)
            return RAISED

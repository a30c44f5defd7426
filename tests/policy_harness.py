"""A whole executor and core over the in-memory store, driven one step at a
time: the writer commits inline, the launcher runs nothing until the test
ends an attempt, and both clocks move only when the test says. Not a test
module; the policy tests use it."""

from __future__ import annotations

import contextvars
import json
from typing import Any

from deferred_middleware import _protocol as protocol
from deferred_middleware._config import Config
from deferred_middleware._context import current_job
from deferred_middleware._core import JobCore
from deferred_middleware._jobs import (
    DeferredOptions,
    Job,
    Outcome,
    StoredRequest,
    StoredResponse,
)
from deferred_middleware._metrics import Metrics
from deferred_middleware._notify import Notifier
from deferred_middleware._operator import OperatorRoutes
from deferred_middleware.runner._dispatch import Dispatcher, Ended
from deferred_middleware.store import MemoryJobStore
from deferred_middleware.store._writer import BatchWriter

from .support import FakeClock


class InlineWriter(BatchWriter):
    """The real batch writing, done at once in the caller's thread."""

    def _put(self, item: tuple[str, Any, Any]) -> None:
        self._write([item])


class Launched:
    """One replay the test ends by hand, as a task (interruptible) or a thread."""

    def __init__(
        self,
        request: StoredRequest,
        context: contextvars.Context,
        ended: Ended,
        interruptible: bool,
    ) -> None:
        self.request = request
        self.context = context
        self.ended: Ended | None = ended
        self.interruptible = interruptible
        self.cancel_calls = 0
        self.finished = False
        self.job_id = context.run(lambda: current_job().id)

    def cancel(self) -> bool:
        self.cancel_calls += 1
        if not self.interruptible or self.finished:  # as a task that has ended
            return False
        self.end(None)  # a cancelled task ends promptly
        return True

    def end(self, outcome: Outcome | None) -> None:
        """As a task's coroutine, which lets go of what it ran once it returns."""
        assert not self.finished, "ended twice"
        self.finished = True
        ended, self.ended = self.ended, None
        ended(outcome)

    def respond(self, status: int = 200, body: bytes = b"ok") -> None:
        self.end(StoredResponse(status, [("content-type", "text/plain")], body))

    def progress(self, fraction: float | None, message: str | None = None) -> None:
        """As the handler would, from inside the attempt's context."""
        self.context.run(lambda: current_job().progress(fraction, message))


class ScriptedLauncher:
    def __init__(self, interruptible: bool = True) -> None:
        self.interruptible = interruptible
        self.launched: list[Launched] = []
        self.refuse = False

    def launch(
        self, request: StoredRequest, context: contextvars.Context, ended: Ended
    ) -> Launched:
        if self.refuse:
            raise RuntimeError("cannot start")
        run = Launched(request, context, ended, self.interruptible)
        self.launched.append(run)
        return run

    def last(self, job_id: str) -> Launched:
        return [run for run in self.launched if run.job_id == job_id][-1]

    def count(self, job_id: str) -> int:
        return sum(1 for run in self.launched if run.job_id == job_id)


class Harness:
    def __init__(self, *, interruptible: bool = True, **options: Any) -> None:
        self.clock = FakeClock()
        self.now = 1000.0
        self.config = Config.build(database_url="memory://", **options)
        self.store = MemoryJobStore(
            credential_headers=self.config.credential_headers, clock=self.clock
        )
        self.writer = InlineWriter(self.store)
        self.notifier = Notifier()
        self.launcher = ScriptedLauncher(interruptible)
        self.metrics = Metrics()
        if self.config.metrics:
            self.metrics.switch_on(self.store, self.clock)
        self.dispatcher = Dispatcher(
            self.config,
            self.store,
            self.writer,
            self.notifier,
            self.launcher,
            clock=self.clock,
            monotonic=lambda: self.now,
            metrics=self.metrics,
        )
        self.core = JobCore(
            self.config,
            self.store,
            self.writer,
            self.notifier,
            self.dispatcher,
            clock=self.clock,
            monotonic=lambda: self.now,
            metrics=self.metrics,
        )
        self.operator = OperatorRoutes(self.core)

    def submit(
        self,
        *,
        retries: int = 0,
        timeout: float | None = None,
        headers: list[tuple[str, str]] | None = None,
        queue: str | None = None,
        owner: str | None = None,
        query: bytes = b"",
    ) -> str:
        request = StoredRequest("POST", "/reports", query, headers or [], b"{}")
        options = DeferredOptions(retries=retries, timeout=timeout, queue=queue)
        return self.core.accept(request, options, owner).id

    def claim(self) -> int:
        return self.dispatcher.claim_step()

    def tend(self) -> None:
        self.dispatcher.tend_step()

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.now += seconds

    def job(self, job_id: str) -> Job:
        job = self.store.get(job_id, request=True, response=True)
        assert job is not None
        return job

    def route(self, path: str, method: str = "GET", query: bytes = b"") -> protocol.Reply:
        tail = protocol.job_route_tail(self.config.prefix, path)
        assert tail is not None
        return self.core.answer(tail, method, query, "")

    def document(self, job_id: str) -> dict[str, Any]:
        reply = self.route(f"/jobs/{job_id}")
        assert reply.status == 200
        return json.loads(reply.body)  # type: ignore[no-any-return]

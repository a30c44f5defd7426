"""One attempt at a job, as the executor tracks it, and the small contracts
around it: what a launcher does, what a launched replay can do, and what
runs beside the executor."""

from __future__ import annotations

import contextvars
import enum
import functools
import threading
from collections.abc import Callable
from typing import Protocol

from .._context import RunningJob
from .._jobs import AttemptWrite, Job, Outcome, StoredRequest


class Running(Protocol):
    """A launched replay, as much as the runtime lets us stop it."""

    def cancel(self) -> bool:
        """Interrupt it; False where the runtime cannot (a thread)."""


Ended = Callable[["Outcome | None"], None]


class Launcher(Protocol):
    """Replays a stored request into an app, inside ``context``, and calls
    ``ended`` with the outcome (None when the replay was cancelled)."""

    def launch(
        self, request: StoredRequest, context: contextvars.Context, ended: Ended
    ) -> Running: ...


class SideLoop(Protocol):
    name: str

    def run(self, stopping: threading.Event) -> None:
        """Work until ``stopping`` is set."""


class State(enum.Enum):
    RUNNING = "running"
    TIMED_OUT = "timed out"  # waiting for an uninterruptible replay to return
    SETTLING = "settling"  # its outcome is being written
    INTERRUPTED = "interrupted"  # canceled, taken back or shut down: never settled
    DONE = "done"


class Attempt:
    def __init__(
        self,
        job: Job,
        started: float,
        report: Callable[[str, int, float | None, str | None], None],
    ) -> None:
        self.job = job
        self.number = job.attempts
        self.started = started
        self.state = State.RUNNING
        self.handle: Running | None = None
        # Not a closure over the attempt: the job's context holds this, the
        # attempt holds the task that holds that context, and such a cycle
        # per job left every ended attempt to the garbage collector.
        self.running_job = RunningJob(
            job.id, self.number, functools.partial(report, job.id, self.number)
        )
        self.unwritten: AttemptWrite | None = None
        self.write_delay = 0.1
        self.write_again_at = 0.0

    def overdue(self, now: float) -> bool:
        timeout = self.job.options.timeout
        return timeout is not None and now - self.started > timeout

    @property
    def last(self) -> bool:
        return self.number >= self.job.max_attempts

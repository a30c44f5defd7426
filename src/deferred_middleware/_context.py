"""``current_job()``: the running job, as seen from inside its handler.

A context variable, so it follows the handler into Starlette's thread pool
for sync endpoints and stays out of every other request.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable


class RunningJob:
    """The job a deferred handler is running for."""

    def __init__(
        self, job_id: str, attempt: int, report: Callable[[float | None, str | None], None]
    ) -> None:
        self.id = job_id
        self.attempt = attempt
        self._report = report
        # Set by a framework hook when the app rendered its own error page for
        # an exception (Flask's HTML 500): the attempt failed, it has no result.
        self.raised = False
        self.exception: BaseException | None = None  # what it raised, for operators

    def progress(self, fraction: float | None, message: str | None = None) -> None:
        """Show how far the job has come on its status route.

        Never blocks: the update is written in the background, so it is safe
        to call from async handlers and from tight loops.
        """
        if fraction is not None:
            if math.isnan(fraction):
                raise ValueError("progress must be a number between 0 and 1")
            fraction = min(max(float(fraction), 0.0), 1.0)
        self._report(fraction, message)

    def __repr__(self) -> str:
        return f"<RunningJob {self.id} attempt={self.attempt}>"


_current: contextvars.ContextVar[RunningJob | None] = contextvars.ContextVar(
    "deferred_middleware_current_job", default=None
)


def current_job() -> RunningJob:
    """The job being run. Raises LookupError outside a deferred handler, where
    there is no job (for example when the same view serves a plain request)."""
    job = _current.get()
    if job is None:
        raise LookupError("current_job() was called outside a running deferred job")
    return job


def set_current(job: RunningJob | None) -> contextvars.Token[RunningJob | None]:
    return _current.set(job)


def reset_current(token: contextvars.Token[RunningJob | None]) -> None:
    _current.reset(token)

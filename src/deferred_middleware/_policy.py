"""The rules that decide what an attempt's outcome does to its job.

Pure functions over the job model: the dispatcher applies them, the store
only carries out the fenced write they return, and the unit tests can state
each rule without a database or a thread.
"""

from __future__ import annotations

import traceback

from ._jobs import RAISED, Failure, Finish, Job, Outcome, RetryLater, Status, StoredResponse

MAX_BACKOFF = 300.0


def backoff(attempt: int, first_delay: float) -> float:
    """Seconds before attempt ``attempt + 1``: doubled each time, capped."""
    return min(first_delay * 2 ** (attempt - 1), MAX_BACKOFF)


def settle(job: Job, attempt: int, outcome: Outcome, first_delay: float) -> Finish | RetryLater:
    """A response below 500 succeeds. Anything else (a 5xx, a raise, a
    timeout) fails the attempt: the job runs again after a backoff while it
    has attempts left, and fails with the last attempt's response or error
    once it has none."""
    if isinstance(outcome, StoredResponse):
        if outcome.status < 500:
            return Finish(job.id, attempt, Status.SUCCEEDED, response=outcome)
        error = f"The handler answered {outcome.status}."
        response: StoredResponse | None = outcome
        detail = None
    else:
        error, detail = outcome.error, outcome.detail
        response = None
    if attempt < job.max_attempts:
        return RetryLater(job.id, attempt, backoff(attempt, first_delay), error, detail)
    return Finish(job.id, attempt, Status.FAILED, response=response, error=error, detail=detail)


def raised(exception: BaseException | None) -> Failure:
    """RAISED, with the exception's type and traceback for operators."""
    if exception is None:
        return RAISED
    detail = "".join(traceback.format_exception(exception)).rstrip()
    return Failure(RAISED.error, detail)

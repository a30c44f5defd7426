"""One INFO line per job event on the ``deferred_middleware`` logger:
accepted, started, finished (with its outcome and duration), retried and
reaped. The job id, queue and route (and, where they apply, the attempt,
outcome and duration) go in as ``extra`` fields too, so a JSON formatter
carries them without parsing the message.

Nothing is built unless INFO is enabled: accepting stays as cheap as before
for anyone who does not read these lines.
"""

from __future__ import annotations

import logging

from ._jobs import Finish, Job, RetryLater, request_line

logger = logging.getLogger("deferred_middleware")


def route_of(job: Job) -> str | None:
    if job.route is not None:
        return job.route
    request = job.request
    return None if request is None else request_line(request.method, request.path)


def _fields(job: Job, **more: object) -> dict[str, object]:
    return {"job_id": job.id, "queue": job.queue, "route": route_of(job), **more}


def accepted(job: Job) -> None:
    if logger.isEnabledFor(logging.INFO):
        fields = _fields(job)
        logger.info(
            "job %s accepted: %s (queue %s)", job.id, fields["route"], job.queue, extra=fields
        )


def started(job: Job, attempt: int, worker: str) -> None:
    if logger.isEnabledFor(logging.INFO):
        fields = _fields(job, attempt=attempt, worker=worker)
        logger.info("job %s started: attempt %d on %s", job.id, attempt, worker, extra=fields)


def settled(job: Job, write: Finish | RetryLater, seconds: float) -> None:
    """A finished attempt: the job ended (succeeded or failed), or runs again later."""
    if not logger.isEnabledFor(logging.INFO):
        return
    duration_ms = round(seconds * 1000, 1)
    if isinstance(write, RetryLater):
        fields = _fields(
            job, attempt=write.attempt, outcome="retry", duration_ms=duration_ms, error=write.error
        )
        logger.info(
            "job %s retried: attempt %d failed after %.1f ms (%s); again in %.1f s",
            *(job.id, write.attempt, duration_ms, write.error, write.delay),
            extra=fields,
        )
        return
    status = write.response.status if write.response is not None else None
    outcome = write.status.value
    fields = _fields(
        job, attempt=write.attempt, outcome=outcome, duration_ms=duration_ms, status_code=status
    )
    detail = f"answered {status}" if status is not None else write.error
    logger.info(
        "job %s %s: %s in %.1f ms (attempt %d)",
        *(job.id, outcome, detail, duration_ms, write.attempt),
        extra=fields,
    )


def reaped(job_id: str, requeued: bool) -> None:
    """A running job whose worker was lost (its lease ran out): at WARNING,
    since a worker died or stalled."""
    outcome = "requeued" if requeued else "failed"
    logger.warning(
        "job %s reaped: its worker was lost; %s",
        *(job_id, "re-queued" if requeued else "failed"),
        extra={"job_id": job_id, "outcome": outcome},
    )

"""One row of the in-memory store, and the writes that change it: what the
SQL table does in its statements, done to plain objects."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta

from .._jobs import (
    WEBHOOK_PENDING,
    AttemptWrite,
    Finish,
    Job,
    Progress,
    Requeue,
    RetryLater,
    Status,
    request_line,
)
from ._credentials import merge_credentials


@dataclasses.dataclass
class Row:
    job: Job
    run_after: datetime
    credentials: list[tuple[int, str, str]]
    worker: str | None = None
    lease_expires_at: datetime | None = None
    webhook_due_at: datetime | None = None
    webhook_lease_until: datetime | None = None
    webhook_worker: str | None = None
    error_detail: str | None = None


def apply(row: Row, write: AttemptWrite, now: datetime) -> None:
    job = row.job
    if isinstance(write, Progress):
        job.progress, job.message = write.progress, write.message
        job.revision += 1
    elif isinstance(write, Finish):
        end(row, write.status, now)
        job.error, row.error_detail = write.error, write.detail
        job.response = write.response
    else:
        back_in_the_queue(row)
        if isinstance(write, RetryLater):
            row.run_after = now + timedelta(seconds=write.delay)
            job.error, row.error_detail = write.error, write.detail
        elif isinstance(write, Requeue):
            row.run_after = now
            job.attempts -= 1


def back_in_the_queue(row: Row) -> None:
    """A job back in the queue shows nothing of the run that ended."""
    job = row.job
    job.status = Status.QUEUED
    job.revision += 1
    job.started_at = job.progress = job.message = None
    row.worker = row.lease_expires_at = None


def end(row: Row, status: Status, now: datetime) -> None:
    """A job ended: no lease to keep, no credentials to keep."""
    row.job.status = status
    row.job.revision += 1
    row.job.finished_at = now
    row.lease_expires_at = None
    row.credentials = []
    if row.job.callback_url is not None:
        webhook_due(row, now)


def webhook_due(row: Row, now: datetime) -> None:
    row.job.webhook_state = WEBHOOK_PENDING
    row.job.webhook_attempts = 0
    row.webhook_due_at = now
    row.webhook_lease_until = None


def detached(
    row: Row, *, request: bool = False, response: bool = False, route: bool = False
) -> Job:
    """A detached copy, shaped like a SQL read: only what was asked for."""
    job = row.job
    stored = job.request
    if request and stored is not None:
        headers = merge_credentials(stored.headers, row.credentials)
        stored = dataclasses.replace(stored, headers=headers)
    line = request_line(stored.method, stored.path) if stored is not None else None
    return dataclasses.replace(
        job,
        request=stored if request else None,
        response=job.response if response else None,
        route=line if request or route else None,
    )

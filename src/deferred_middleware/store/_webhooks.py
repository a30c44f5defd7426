"""The job table's webhook queries: claiming due deliveries with a lease,
recording each attempt, and the operator's view and retry."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from .._jobs import (
    FINISHED,
    WEBHOOK_PENDING,
    WebhookAttempt,
    WebhookDue,
)
from . import _codec as codec
from ._base import Clock
from ._dialects import Dialect
from ._schema import jobs, webhook_attempts

FINISHED_VALUES = [status.value for status in FINISHED]


class WebhookQueries:
    """Mixed into :class:`SQLJobStore`, which supplies the transaction."""

    clock: Clock
    dialect: Dialect
    engine: sa.Engine

    if TYPE_CHECKING:

        def _transaction(
            self, erasing: Sequence[str] = ()
        ) -> contextlib.AbstractContextManager[sa.Connection]: ...

    def claim_webhooks(self, worker: str, limit: int, lease_seconds: float) -> list[WebhookDue]:
        now = self.clock()
        lease_free = sa.or_(jobs.c.webhook_lease_until.is_(None), jobs.c.webhook_lease_until < now)
        due = (
            sa.select(jobs.c.id)
            .where(
                jobs.c.webhook_state == WEBHOOK_PENDING, jobs.c.webhook_due_at <= now, lease_free
            )
            .order_by(jobs.c.webhook_due_at)
            .limit(limit)
        )
        values = codec.webhook_claim_values(worker, now, lease_seconds)
        columns = (*codec.STATUS_COLUMNS, jobs.c.request_meta)
        with self._transaction() as connection:
            rows = self.dialect.claim(connection, due, values, columns)
            return [codec.webhook_due_from_row(row._mapping, worker) for row in rows]

    def record_webhook(self, attempt: WebhookAttempt, state: str, due_at: datetime | None) -> bool:
        """Keep the attempt; move the delivery on, if this worker still holds it."""
        held = sa.and_(
            jobs.c.id == attempt.job_id,
            jobs.c.webhook_state == WEBHOOK_PENDING,
            jobs.c.webhook_worker == attempt.worker,
            jobs.c.webhook_attempts == attempt.attempt,
        )
        values = {"webhook_state": state, "webhook_due_at": due_at, "webhook_lease_until": None}
        with self._transaction() as connection:
            connection.execute(webhook_attempts.insert(), codec.webhook_attempt_values(attempt))
            return connection.execute(jobs.update().where(held).values(values)).rowcount == 1

    def webhook_attempts_of(self, job_id: str) -> list[WebhookAttempt]:
        query = (
            sa.select(webhook_attempts)
            .where(webhook_attempts.c.job_id == job_id)
            .order_by(webhook_attempts.c.id)
        )
        with self._transaction() as connection:
            return [codec.webhook_attempt_from_row(r._mapping) for r in connection.execute(query)]

    def redeliver(self, job_id: str) -> bool:
        """Make a finished job's webhook due again, with a fresh set of attempts."""
        now = self.clock()
        finished = sa.and_(
            jobs.c.id == job_id,
            jobs.c.status.in_(FINISHED_VALUES),
            jobs.c.callback_url.is_not(None),
        )
        values: dict[str, Any] = {
            "webhook_state": WEBHOOK_PENDING,
            "webhook_due_at": now,
            "webhook_attempts": 0,
            "webhook_lease_until": None,
        }
        with self._transaction() as connection:
            return connection.execute(jobs.update().where(finished).values(values)).rowcount == 1


def forget_attempts(connection: sa.Connection, job_ids: Sequence[str]) -> None:
    """A job's attempts go with the job."""
    if job_ids:
        connection.execute(webhook_attempts.delete().where(webhook_attempts.c.job_id.in_(job_ids)))

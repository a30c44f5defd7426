"""The job table, in SQLAlchemy Core, portable across SQLite, PostgreSQL and MariaDB."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql

metadata = sa.MetaData()


def naive_utc(value: datetime) -> datetime:
    """A timestamp as the table holds it; a naive one is taken to be UTC already."""
    if value.tzinfo is timezone.utc:  # as the clock gives it: no conversion
        return value.replace(tzinfo=None)
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Stored as naive UTC (every dialect has that), handed out timezone-aware."""

    impl = sa.DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: sa.Dialect) -> sa.types.TypeEngine[Any]:
        if dialect.name in ("mysql", "mariadb"):
            # MySQL's DATETIME drops fractions of a second unless told not to.
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(sa.DateTime())

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        return None if value is None else naive_utc(value)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


# Bodies may be large; MySQL's plain BLOB stops at 64 KiB.
Body = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def _set_only(name: str, *columns: str, unique: bool = False, of: str | None = None) -> sa.Index:
    """An index of the rows whose column ``of`` (by default the last) is
    set, where the database allows partial indexes (MariaDB indexes every
    row). A new job has no lease, no end, mostly no Idempotency-Key and no
    webhook, so accepting it adds no entry to these: one B-tree fewer to
    write per index. Their queries compare that column, which implies IS
    NOT NULL, so they still use them."""
    where = sa.text(f"{of or columns[-1]} IS NOT NULL")
    return sa.Index(name, *columns, unique=unique, postgresql_where=where, sqlite_where=where)


jobs = sa.Table(
    "deferred_jobs",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("queue", sa.String(64), nullable=False, server_default="default"),
    sa.Column("created_at", UTCDateTime(), nullable=False),
    sa.Column("run_after", UTCDateTime(), nullable=False),
    sa.Column("started_at", UTCDateTime()),
    sa.Column("finished_at", UTCDateTime()),
    sa.Column("attempts", sa.Integer(), nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer(), nullable=False, default=1),
    sa.Column("timeout", sa.Float()),
    sa.Column("worker", sa.String(255)),
    sa.Column("lease_expires_at", UTCDateTime()),
    sa.Column("revision", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("progress", sa.Float()),
    sa.Column("message", sa.Text()),
    sa.Column("error", sa.Text()),
    sa.Column("error_detail", LongText),  # for operators: the exception and traceback
    sa.Column("request_method", sa.String(16), nullable=False),
    sa.Column("request_path", LongText, nullable=False),
    sa.Column("request_query", LongText, nullable=False),
    sa.Column("request_headers", sa.JSON(), nullable=False),
    sa.Column("request_credentials", sa.JSON(none_as_null=True)),
    sa.Column("request_meta", sa.JSON(), nullable=False),
    sa.Column("request_body", Body, nullable=False),
    sa.Column("response_status", sa.Integer()),
    sa.Column("response_headers", sa.JSON(none_as_null=True)),
    sa.Column("response_body", Body),
    # The completion webhook: set pending by the statement that ends the job.
    sa.Column("callback_url", LongText),
    sa.Column("webhook_state", sa.String(16)),
    sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("webhook_due_at", UTCDateTime()),
    sa.Column("webhook_lease_until", UTCDateTime()),
    sa.Column("webhook_worker", sa.String(255)),
    sa.Column("owner", sa.String(255)),
    # Digests of an Idempotency-Key with its owner and route, and of the
    # request it came with: the unique index makes concurrent duplicates
    # collide, in every database (which all let NULLs repeat).
    sa.Column("idempotency_key", sa.String(64)),
    sa.Column("request_digest", sa.String(64)),
    # Claims name their queues, so this index serves them and every count
    # by status.
    sa.Index("ix_deferred_jobs_queue_claim", "status", "queue", "run_after"),
    sa.Index("ix_deferred_jobs_created", "created_at"),
    _set_only("ix_deferred_jobs_lease", "status", "lease_expires_at"),
    _set_only("ix_deferred_jobs_finished", "status", "finished_at"),
    _set_only("ux_deferred_jobs_idempotency", "idempotency_key", unique=True),
    # Only jobs with a webhook are in it (where the database can leave the
    # others out): accepting and finishing other jobs never touch it.
    _set_only("ix_deferred_jobs_webhooks", "webhook_state", "webhook_due_at", of="webhook_state"),
)

webhook_attempts = sa.Table(
    "deferred_webhook_attempts",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(32), nullable=False),
    sa.Column("attempt", sa.Integer(), nullable=False),
    sa.Column("at", UTCDateTime(), nullable=False),
    sa.Column("url", LongText, nullable=False),
    sa.Column("status_code", sa.Integer()),
    sa.Column("error", sa.Text()),
    sa.Column("duration_ms", sa.Integer(), nullable=False),
    sa.Column("worker", sa.String(255)),
    sa.Index("ix_deferred_webhook_attempts_job", "job_id"),
)

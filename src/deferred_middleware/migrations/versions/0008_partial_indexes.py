"""Fewer index entries per accepted job: the lease, finished and
Idempotency-Key indexes keep only rows whose column is set (on SQLite and
PostgreSQL; MariaDB has no partial indexes), and the first claim index
goes, since every claim names its queues and the queue-aware index serves it.

Rebuilding an index reads the whole table once, under the migration's lock.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

SET_ONLY = (
    ("ix_deferred_jobs_lease", ["status", "lease_expires_at"], False),
    ("ix_deferred_jobs_finished", ["status", "finished_at"], False),
    ("ux_deferred_jobs_idempotency", ["idempotency_key"], True),
)


def _has_partial_indexes() -> bool:
    return op.get_bind().dialect.name in ("sqlite", "postgresql")


def upgrade() -> None:
    op.drop_index("ix_deferred_jobs_claim", table_name="deferred_jobs")
    if not _has_partial_indexes():
        return
    for name, columns, unique in SET_ONLY:
        where = sa.text(f"{columns[-1]} IS NOT NULL")
        op.drop_index(name, table_name="deferred_jobs")
        op.create_index(
            name,
            "deferred_jobs",
            columns,
            unique=unique,
            postgresql_where=where,
            sqlite_where=where,
        )


def downgrade() -> None:
    if _has_partial_indexes():
        for name, columns, unique in SET_ONLY:
            op.drop_index(name, table_name="deferred_jobs")
            op.create_index(name, "deferred_jobs", columns, unique=unique)
    op.create_index("ix_deferred_jobs_claim", "deferred_jobs", ["status", "run_after"])

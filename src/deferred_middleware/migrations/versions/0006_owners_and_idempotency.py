"""Owners and idempotent submits: who submitted each job, and the digests
of its ``Idempotency-Key`` under a unique index.

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deferred_jobs") as batch:
        batch.add_column(sa.Column("owner", sa.String(255)))
        batch.add_column(sa.Column("idempotency_key", sa.String(64)))
        batch.add_column(sa.Column("request_digest", sa.String(64)))
    op.create_index(
        "ux_deferred_jobs_idempotency", "deferred_jobs", ["idempotency_key"], unique=True
    )


def downgrade() -> None:
    op.drop_index("ux_deferred_jobs_idempotency", table_name="deferred_jobs")
    with op.batch_alter_table("deferred_jobs") as batch:
        for column in ("request_digest", "idempotency_key", "owner"):
            batch.drop_column(column)

"""Queues: each job belongs to one; executors claim only their own.

The column has a server default, so a release from before queues keeps
inserting during a rolling deploy (its jobs land in "default").

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deferred_jobs") as batch:
        batch.add_column(
            sa.Column("queue", sa.String(64), nullable=False, server_default="default")
        )
    op.create_index(
        "ix_deferred_jobs_queue_claim", "deferred_jobs", ["status", "queue", "run_after"]
    )


def downgrade() -> None:
    op.drop_index("ix_deferred_jobs_queue_claim", table_name="deferred_jobs")
    with op.batch_alter_table("deferred_jobs") as batch:
        batch.drop_column("queue")

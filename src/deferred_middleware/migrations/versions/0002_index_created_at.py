"""Index jobs by creation time, for listing the newest jobs first.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_deferred_jobs_created", "deferred_jobs", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_deferred_jobs_created", table_name="deferred_jobs")

"""Completion webhooks: where a job's callback goes, and every delivery attempt.

The delivery state lives on the job's row and is set by the same statement
that ends the job, so a process that dies between finishing a job and
delivering its webhook loses nothing: another executor finds it pending.
Each attempt is kept in a table of its own, for operators.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def _timestamp() -> sa.types.TypeEngine:
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("deferred_jobs") as batch:
        batch.add_column(sa.Column("callback_url", LongText))
        batch.add_column(sa.Column("webhook_state", sa.String(16)))
        batch.add_column(
            sa.Column("webhook_attempts", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("webhook_due_at", _timestamp()))
        batch.add_column(sa.Column("webhook_lease_until", _timestamp()))
        batch.add_column(sa.Column("webhook_worker", sa.String(255)))
    # Partial where the database allows: jobs without a webhook stay out of it.
    op.create_index(
        "ix_deferred_jobs_webhooks",
        "deferred_jobs",
        ["webhook_state", "webhook_due_at"],
        postgresql_where=sa.text("webhook_state IS NOT NULL"),
        sqlite_where=sa.text("webhook_state IS NOT NULL"),
    )
    op.create_table(
        "deferred_webhook_attempts",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("at", _timestamp(), nullable=False),
        sa.Column("url", LongText, nullable=False),
        sa.Column("status_code", sa.Integer()),
        sa.Column("error", sa.Text()),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(255)),
    )
    op.create_index("ix_deferred_webhook_attempts_job", "deferred_webhook_attempts", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_deferred_webhook_attempts_job", table_name="deferred_webhook_attempts")
    op.drop_table("deferred_webhook_attempts")
    op.drop_index("ix_deferred_jobs_webhooks", table_name="deferred_jobs")
    with op.batch_alter_table("deferred_jobs") as batch:
        for column in (
            "webhook_worker",
            "webhook_lease_until",
            "webhook_due_at",
            "webhook_attempts",
            "webhook_state",
            "callback_url",
        ):
            batch.drop_column(column)

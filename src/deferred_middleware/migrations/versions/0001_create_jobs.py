"""Create the job table.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

# Frozen copies of the column types as they were at this revision: a later
# change to the live schema must never change what this revision creates.
Body = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def UTCDateTime() -> sa.types.TypeEngine:  # named as the type it stands for
    return sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deferred_jobs",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("run_after", UTCDateTime(), nullable=False),
        sa.Column("started_at", UTCDateTime()),
        sa.Column("finished_at", UTCDateTime()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("timeout", sa.Float()),
        sa.Column("worker", sa.String(255)),
        sa.Column("lease_expires_at", UTCDateTime()),
        sa.Column("progress", sa.Float()),
        sa.Column("message", sa.Text()),
        sa.Column("error", sa.Text()),
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
    )
    op.create_index("ix_deferred_jobs_claim", "deferred_jobs", ["status", "run_after"])
    op.create_index("ix_deferred_jobs_lease", "deferred_jobs", ["status", "lease_expires_at"])
    op.create_index("ix_deferred_jobs_finished", "deferred_jobs", ["status", "finished_at"])


def downgrade() -> None:
    op.drop_table("deferred_jobs")

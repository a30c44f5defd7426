"""What a failed attempt raised (its type and traceback), kept for operators.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

LongText = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    with op.batch_alter_table("deferred_jobs") as batch:
        batch.add_column(sa.Column("error_detail", LongText))


def downgrade() -> None:
    with op.batch_alter_table("deferred_jobs") as batch:
        batch.drop_column("error_detail")

"""A revision per job: raised by every write that changes its status document.

It numbers the events of ``/jobs/{id}/events`` (so a client resumes after
``Last-Event-ID``, whichever process answers), and is what a status
document's version is. A server default keeps older releases inserting
during a rolling deploy.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deferred_jobs") as batch:
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("deferred_jobs") as batch:
        batch.drop_column("revision")

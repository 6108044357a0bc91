"""Training jobs remember when their broker message was last sent (``enqueued_at``), so a
queued job whose message was lost (a broker that keeps nothing on disk restarted) is sent
again instead of staying queued forever.

Revision ID: 0003_job_enqueued_at
Revises: 0002_trainer
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from promptfleet.db import UTCDateTime

revision = "0003_job_enqueued_at"
down_revision = "0002_trainer"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("enqueued_at", UTCDateTime(), nullable=True))
    op.execute("UPDATE training_jobs SET enqueued_at = created_at WHERE status = 'queued'")


def downgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("enqueued_at")

"""Training jobs record the example-passes they were admitted for (epochs x examples, or
max_steps x batch_size when smaller), so a tenant's rolling training budget is one SUM
over its recent jobs. Jobs from before this revision count as 0.

Revision ID: 0004_job_example_passes
Revises: 0003_job_enqueued_at
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_job_example_passes"
down_revision = "0003_job_enqueued_at"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("example_passes", sa.BigInteger(), nullable=True))
    op.create_index("ix_training_jobs_tenant_created", "training_jobs", ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_training_jobs_tenant_created", table_name="training_jobs")
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("example_passes")

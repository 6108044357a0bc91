"""Adapter versions carry optional decoding defaults (temperature, top_p, top_k,
repetition_penalty, max_tokens, stop) that requests naming them inherit for the fields
they leave unset. Existing versions get none (the server's defaults, as before).

Revision ID: 0005_adapter_generation_defaults
Revises: 0004_job_example_passes
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_adapter_generation_defaults"
down_revision = "0004_job_example_passes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        batch.add_column(sa.Column("generation_defaults", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_column("generation_defaults")

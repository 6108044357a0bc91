"""ORM rows of the trainer: uploaded datasets and training jobs.

The schema is created by the Alembic revision ``0002_trainer``; these classes only map it.
JSON columns are replaced wholesale on update (no in-place mutation tracking).
"""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from promptfleet.db import Base, UTCDateTime, utcnow
from promptfleet.tenants.models import Tenant  # noqa: F401  (registers the "tenants" table for the FK)

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running")
FINISHED_STATUSES = ("succeeded", "failed", "cancelled")
METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")


def new_id() -> str:
    return uuid.uuid4().hex


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    num_examples: Mapped[int] = mapped_column(Integer)
    num_tokens: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "num_examples": self.num_examples, "num_tokens": self.num_tokens,
                "size_bytes": self.size_bytes, "sha256": self.sha256, "created_at": self.created_at}


class TrainingJob(Base):
    __tablename__ = "training_jobs"
    __table_args__ = (Index("ix_training_jobs_tenant_created", "tenant_id", "created_at"),)  # rolling budget

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    adapter_name: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[str] = mapped_column(String(32), ForeignKey("datasets.id", ondelete="CASCADE"))
    method: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    adapter_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    adapter: Mapped[str | None] = mapped_column(String(160), nullable=True)  # "name@version"
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    celery_task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # last broker message sent
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # what the job was admitted for (epochs x examples, or max_steps x batch_size); NULL before 0004
    example_passes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """The public view (``GET /v1/jobs/{id}``)."""
        return {
            "id": self.id, "status": self.status, "progress": self.progress, "step": self.step,
            "total_steps": self.total_steps, "metrics": self.metrics or {}, "adapter": self.adapter,
            "adapter_name": self.adapter_name, "dataset_id": self.dataset_id, "method": self.method,
            "params": self.params or {}, "error": self.error, "cancel_requested": self.cancel_requested,
            "attempts": self.attempts, "worker": self.worker, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at,
        }

"""ORM row for one stored version of a tenant's adapter."""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from promptfleet.db import Base, UTCDateTime, utcnow
from promptfleet.tenants.models import Tenant  # noqa: F401  (registers the "tenants" table for the FK)


class AdapterVersion(Base):
    """One immutable version of ``(tenant, name)``; the weights live in blob storage under ``sha256``."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name", "version", name="uq_adapter_versions_tenant_name_version"),
        Index("ix_adapter_versions_tenant_name", "tenant_id", "name"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(32), ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    peft_type: Mapped[str] = mapped_column(String(32), nullable=False)
    num_virtual_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    shapes: Mapped[dict] = mapped_column(JSON, nullable=False)  # {"prompt_embeddings": [n, dim]}
    base_fingerprint: Mapped[str] = mapped_column(String(128), nullable=False)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # The training job that produced this version (None for uploads); unique for idempotency.
    source_job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, unique=True)
    # Decoding defaults for requests naming this version (adapters/generation_defaults.py);
    # None: the server's. Set at upload (generation_config.json) or by PATCH.
    generation_defaults: Mapped[dict | None] = mapped_column(JSON, nullable=True)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def deleted(self) -> bool:
        return self.deleted_at is not None

    def __repr__(self) -> str:
        return f"AdapterVersion({self.ref!r}, tenant_id={self.tenant_id!r}, sha256={self.sha256[:12]!r})"

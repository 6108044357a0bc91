"""Per-tenant storage quota: what a tenant keeps stored (live adapter versions and
datasets) may not pass ``tenant_max_storage_mb``. An upload is checked before anything
is stored, counting the upload at its uploaded size; deleting adapters frees quota.

The check locks the tenant (``tenants.service.lock_tenant``) until the request's
transaction ends, so a tenant's uploads are checked and stored one at a time: two
uploads racing at the edge cannot both pass (tested on SQLite and PostgreSQL).
"""
from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from promptfleet.adapters.models import AdapterVersion
from promptfleet.api.errors import APIError
from promptfleet.tenants.service import lock_tenant
from promptfleet.trainer.models import Dataset


def stored_bytes(session: Session, *, tenant_id: str) -> int:
    adapters = session.scalar(select(func.coalesce(func.sum(AdapterVersion.size_bytes), 0))
                              .where(AdapterVersion.tenant_id == tenant_id, AdapterVersion.deleted_at.is_(None)))
    datasets = session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0))
                              .where(Dataset.tenant_id == tenant_id))
    return int(adapters or 0) + int(datasets or 0)


def check_storage_quota(session: Session, *, tenant_id: str, adding: int, limit_mb: float) -> None:
    """403 ``storage_quota_exceeded`` when storing ``adding`` more bytes would pass the
    quota. Holds the tenant's lock from here to the caller's commit or rollback."""
    if limit_mb <= 0:
        return
    lock_tenant(session, tenant_id=tenant_id)
    limit = int(limit_mb * (1 << 20))
    used = stored_bytes(session, tenant_id=tenant_id)
    if used + adding > limit:
        raise APIError(403, f"storage quota exceeded: this tenant stores {used} bytes, this upload adds {adding}, "
                            f"the quota is {limit} bytes ({limit_mb:g} MiB, tenant_max_storage_mb); delete adapter "
                            "versions to free space", code="storage_quota_exceeded")

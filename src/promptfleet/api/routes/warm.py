"""``GET /admin/cache/adapters`` (admin key): the adapters warm in THIS replica's device
cache, most recently used first, with the live versions (tenant, name, version) that share
each prefix, so a router or autoscaler can send an adapter's traffic to a replica that holds
it. ``promptfleet_adapter_warm`` on ``/metrics`` carries the same list by sha256.

A prefix stays cached after its last version is deleted (keys are content hashes and
nothing serves a deleted version: every request resolves its name in the database); such an
entry is listed with no versions until the LRU evicts it."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from promptfleet.adapters.models import AdapterVersion
from promptfleet.adapters.service import split_cache_key
from promptfleet.api.deps import SessionDep, StateDep
from promptfleet.api.responses import error_responses
from promptfleet.tenants.models import Tenant

router = APIRouter(tags=["admin"])


class WarmVersion(BaseModel):
    tenant_id: str
    tenant: str
    name: str
    version: int


class WarmAdapter(BaseModel):
    object: Literal["warm_adapter"] = "warm_adapter"
    sha256: str = Field(description="The adapter's content hash (its blob).")
    base_fingerprint: str = Field(description="The backbone the prefix was built for.")
    bytes: int = Field(description="Device memory the prefix holds.")
    versions: list[WarmVersion] = Field(description="Live adapter versions with these weights, any tenant.")


class WarmList(BaseModel):
    object: Literal["list"] = "list"
    replica: str = Field(description="This replica (settings replica_id; the 'replica' label of /metrics).")
    entries: int
    bytes_used: int
    budget_bytes: int
    data: list[WarmAdapter]


def _live_versions(session: Session, sha256s: list[str]) -> dict[tuple[str, str], list[WarmVersion]]:
    """Live versions per ``(sha256, base_fingerprint)`` (a cache key's parts) of the adapters ``sha256s``."""
    out: dict[tuple[str, str], list[WarmVersion]] = {}
    if not sha256s:
        return out
    rows = session.execute(
        select(AdapterVersion.sha256, AdapterVersion.base_fingerprint, AdapterVersion.tenant_id, Tenant.name,
               AdapterVersion.name, AdapterVersion.version)
        .join(Tenant, Tenant.id == AdapterVersion.tenant_id)
        .where(AdapterVersion.sha256.in_(sha256s), AdapterVersion.deleted_at.is_(None))
        .order_by(Tenant.name, AdapterVersion.name, AdapterVersion.version))
    for sha, base, tenant_id, tenant, name, version in rows:
        out.setdefault((sha, base), []).append(
            WarmVersion(tenant_id=tenant_id, tenant=tenant, name=name, version=version))
    return out


@router.get("/cache/adapters", response_model=WarmList, responses=error_responses(401, 503))
def warm_adapters(state: StateDep, session: SessionDep) -> WarmList:
    """What this replica's adapter device cache holds now."""
    cache = state.adapter_cache
    entries = cache.entries()
    stats = cache.stats()
    versions = _live_versions(session, sorted({split_cache_key(e.key)[0] for e in entries}))
    data = []
    for entry in entries:
        sha256, base = split_cache_key(entry.key)
        data.append(WarmAdapter(sha256=sha256, base_fingerprint=base, bytes=entry.nbytes,
                                versions=versions.get((sha256, base), [])))
    return WarmList(replica=state.settings.replica_id, entries=len(data), bytes_used=stats.bytes_used,
                    budget_bytes=stats.budget_bytes, data=data)

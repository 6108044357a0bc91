"""Tenants and their API keys. Functions take the caller's session and only flush: the
caller owns the transaction (``promptfleet.db.session_scope``)."""
from __future__ import annotations

import logging
import re
import uuid

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from promptfleet.db import utcnow
from promptfleet.paging import Page, SortKey, UnknownCursor, fetch_page
from promptfleet.tenants.keys import display_prefix, generate_api_key, hash_api_key, looks_like_api_key
from promptfleet.tenants.models import ApiKey, Tenant

log = logging.getLogger(__name__)

TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class InvalidTenantName(ValueError):
    """A tenant name that is not a lowercase slug of 1..64 characters."""


class TenantExistsError(ValueError):
    """A tenant with this name already exists."""


class TenantNotFound(LookupError):
    """No tenant with this id."""


def validate_tenant_name(name: str) -> str:
    if not isinstance(name, str) or not TENANT_NAME_RE.fullmatch(name):
        raise InvalidTenantName(
            f"invalid tenant name {name!r}: use 1 to 64 characters from a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit")
    return name


def _new_key(session: Session, tenant_id: str) -> str:
    api_key = generate_api_key()
    session.add(ApiKey(id=uuid.uuid4().hex, tenant_id=tenant_id, prefix=display_prefix(api_key),
                       key_hash=hash_api_key(api_key), created_at=utcnow()))
    return api_key


def create_tenant(session: Session, *, name: str, max_concurrent: int | None = None,
                  rate_per_s: float | None = None, rate_burst: int | None = None) -> tuple[Tenant, str]:
    """Create a tenant and its first API key; the clear key is returned here and never again."""
    validate_tenant_name(name)
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise TenantExistsError(f"a tenant named {name!r} already exists")
    tenant = Tenant(id=uuid.uuid4().hex, name=name, created_at=utcnow(), max_concurrent=max_concurrent,
                    rate_per_s=rate_per_s, rate_burst=rate_burst)
    try:
        with session.begin_nested():
            session.add(tenant)
            session.flush()
            api_key = _new_key(session, tenant.id)
    except IntegrityError as exc:  # a concurrent create of the same name won the race
        raise TenantExistsError(f"a tenant named {name!r} already exists") from exc
    log.info("created tenant %s (%s)", name, tenant.id)
    return tenant, api_key


def list_tenants(session: Session) -> list[Tenant]:
    return list(session.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.name)))


_TENANT_ORDER = (SortKey(Tenant.created_at), SortKey(Tenant.name))


def page_tenants(session: Session, *, limit: int, after: str | None = None) -> Page[Tenant]:
    """``limit`` tenants in ``list_tenants``' order (oldest first, names unique) after the
    tenant whose id is ``after`` (``UnknownCursor`` when there is none)."""
    cursor = None
    if after is not None:
        row = session.execute(select(Tenant.created_at, Tenant.name).where(Tenant.id == after)).first()
        if row is None:
            raise UnknownCursor(f"unknown cursor {after!r}")
        cursor = tuple(row)
    return fetch_page(session, select(Tenant), keys=_TENANT_ORDER, after=cursor, limit=limit)


def get_tenant(session: Session, *, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise TenantNotFound(f"tenant {tenant_id!r} not found")
    return tenant


def get_tenant_by_name(session: Session, *, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        raise TenantNotFound(f"tenant named {name!r} not found")
    return tenant


def authenticate(session: Session, *, api_key: str) -> Tenant | None:
    """The tenant owning an active key, or None. Lookup is by SHA-256 of the key, so the
    clear key is never compared (nor stored) and timing reveals nothing about stored keys."""
    if not looks_like_api_key(api_key):
        return None
    stmt = (select(Tenant).join(ApiKey, ApiKey.tenant_id == Tenant.id)
            .where(ApiKey.key_hash == hash_api_key(api_key), ApiKey.revoked_at.is_(None)))
    return session.scalar(stmt)


LIMIT_FIELDS = ("max_concurrent", "rate_per_s", "rate_burst")


def set_tenant_limits(session: Session, *, tenant_id: str, limits: dict) -> Tenant:
    """Set the given per-tenant limits (None: the server's default); read on every request,
    so they hold from the next one, on every replica."""
    unknown = set(limits) - set(LIMIT_FIELDS)
    if unknown:
        raise ValueError(f"unknown tenant limit(s): {', '.join(sorted(unknown))}")
    tenant = get_tenant(session, tenant_id=tenant_id)
    for name, value in limits.items():
        setattr(tenant, name, value)
    session.flush()
    log.info("tenant %s limits: %s", tenant_id, {k: getattr(tenant, k) for k in LIMIT_FIELDS})
    return tenant


def rotate_key(session: Session, *, tenant_id: str) -> str:
    """Revoke every active key of the tenant and return a new one (shown once)."""
    get_tenant(session, tenant_id=tenant_id)
    session.execute(update(ApiKey).where(ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
                    .values(revoked_at=utcnow()))
    api_key = _new_key(session, tenant_id)
    session.flush()
    log.info("rotated the API key of tenant %s", tenant_id)
    return api_key


def list_keys(session: Session, *, tenant_id: str) -> list[ApiKey]:
    """The tenant's keys (active and revoked), oldest first; only display prefixes are known."""
    return list(session.scalars(select(ApiKey).where(ApiKey.tenant_id == tenant_id)
                                .order_by(ApiKey.created_at, ApiKey.id)))


def lock_tenant(session: Session, *, tenant_id: str) -> bool:
    """Serialise one tenant's writes until the caller's transaction ends (commit or
    rollback): quota and job-limit checks, version numbering. Returns whether the tenant
    exists.

    PostgreSQL: ``SELECT ... FOR NO KEY UPDATE`` on the tenant row, which leaves inserts
    referencing it alone. SQLite ignores ``FOR UPDATE``, and its Python driver only opens a
    transaction at the first write, so a no-op ``UPDATE`` of the row takes the database's
    write lock now (waiting up to the busy timeout) and later reads see the latest commits.
    """
    if session.get_bind().dialect.name == "sqlite":
        stmt = update(Tenant).where(Tenant.id == tenant_id).values(id=Tenant.id)
        return session.execute(stmt.execution_options(synchronize_session=False)).rowcount > 0
    stmt = select(Tenant.id).where(Tenant.id == tenant_id).with_for_update(key_share=True)
    return session.execute(stmt).first() is not None

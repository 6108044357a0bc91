"""FastAPI dependencies: the app state, settings, a DB session per request, the current
tenant (from ``Authorization: Bearer <key>``), the admin check and the rate limit.

Dependencies that only compute are ``async`` (run inline on the event loop); those that
touch the database are plain functions (FastAPI runs them in worker threads)."""
from __future__ import annotations

import hmac
import re
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from promptfleet.api.errors import APIError, too_many_requests, unauthorized
from promptfleet.api.limits import LimitExceeded, TenantLimits
from promptfleet.api.state import AppState
from promptfleet.db import session_scope
from promptfleet.settings import Settings
from promptfleet.tenants.models import Tenant
from promptfleet.tenants.service import authenticate

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def plausible_id(value: str) -> bool:
    """Row ids are uuid4 hex: anything else cannot exist, so it never reaches the database."""
    return bool(_ID_RE.fullmatch(value))


async def get_state(request: Request) -> AppState:
    state = getattr(request.app.state, "pf", None)
    if state is None:
        raise APIError(503, "the server is starting or stopping", code="not_ready", headers={"Retry-After": "5"})
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(state: StateDep) -> Iterator[Session]:
    """One session per request: committed when the route returns, rolled back on error."""
    with session_scope(state.session_factory) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise unauthorized("missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise unauthorized("malformed Authorization header; expected 'Bearer <api key>'")
    return token


def current_tenant(request: Request, state: StateDep) -> Tenant:
    """The tenant owning the Bearer key (401 otherwise). Its own short session: the pooled
    connection goes back at once, not held while the request waits (for a worker thread,
    the engine, a stream)."""
    token = bearer_token(request)
    with state.session_factory() as session:
        tenant = authenticate(session, api_key=token)
    if tenant is None:
        raise unauthorized("invalid API key")
    request.state.tenant = tenant.name  # for the access log and metrics (never the key)
    return tenant


TenantDep = Annotated[Tenant, Depends(current_tenant)]


def tenant_limits(tenant: Tenant, settings: Settings) -> TenantLimits:
    return TenantLimits(
        max_concurrent=tenant.max_concurrent if tenant.max_concurrent is not None else settings.tenant_max_concurrent,
        rate_per_s=tenant.rate_per_s if tenant.rate_per_s is not None else settings.tenant_rate_per_s,
        burst=tenant.rate_burst if tenant.rate_burst is not None else settings.tenant_rate_burst)


async def rate_limited_tenant(tenant: TenantDep, state: StateDep) -> Tenant:
    """The current tenant, after taking one token from its request-rate bucket (429 when empty)."""
    try:
        state.limiter.check_rate(tenant.id, tenant_limits(tenant, state.settings))
    except LimitExceeded as exc:
        state.metrics.rejected.labels(tenant.name, "rate").inc()
        raise too_many_requests(str(exc), retry_after=exc.retry_after) from exc
    return tenant


LimitedTenantDep = Annotated[Tenant, Depends(rate_limited_tenant)]


async def require_admin(request: Request, settings: SettingsDep) -> None:
    token = bearer_token(request)
    if not settings.admin_key or not hmac.compare_digest(token.encode(), settings.admin_key.encode()):
        raise unauthorized("invalid admin key")
    request.state.tenant = "admin"

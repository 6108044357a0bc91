"""``/admin``: tenants and their API keys, behind the admin key. A tenant's key is shown
once, when the tenant is created or its key rotated."""
from __future__ import annotations

from fastapi import APIRouter, Depends

from promptfleet.api.deps import SessionDep, plausible_id, require_admin
from promptfleet.api.errors import APIError, bad_request, not_found
from promptfleet.api.pagination import PageDep, page_fields, unknown_cursor
from promptfleet.api.responses import error_responses
from promptfleet.api.routes import warm
from promptfleet.api.schemas import TenantCreate, TenantCreated, TenantKey, TenantLimitsPatch, TenantList, TenantOut
from promptfleet.paging import UnknownCursor
from promptfleet.tenants.models import Tenant
from promptfleet.tenants.service import (InvalidTenantName, TenantExistsError, TenantNotFound, create_tenant,
                                         get_tenant, page_tenants, rotate_key, set_tenant_limits)

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)])
router.include_router(warm.router)  # /admin/cache/adapters: what this replica holds warm


def tenant_out(t: Tenant) -> dict:
    return dict(id=t.id, name=t.name, created_at=t.created_at, max_concurrent=t.max_concurrent,
                rate_per_s=t.rate_per_s, rate_burst=t.rate_burst)


@router.post("/tenants", status_code=201, response_model=TenantCreated,
             responses=error_responses(400, 401, 409, 413, 422))
def new_tenant(body: TenantCreate, session: SessionDep) -> TenantCreated:
    try:
        tenant, api_key = create_tenant(session, name=body.name, max_concurrent=body.max_concurrent,
                                        rate_per_s=body.rate_per_s, rate_burst=body.rate_burst)
        session.commit()
    except InvalidTenantName as exc:
        raise bad_request(str(exc), code="invalid_tenant_name", param="name") from None
    except TenantExistsError as exc:
        raise APIError(409, str(exc), code="tenant_exists") from None
    return TenantCreated(api_key=api_key, **tenant_out(tenant))


@router.get("/tenants", response_model=TenantList, responses=error_responses(400, 401, 422))
def all_tenants(session: SessionDep, page: PageDep) -> TenantList:
    """Tenants, oldest first."""
    if page.after is not None and not plausible_id(page.after):
        raise unknown_cursor(page.after)
    try:
        rows = page_tenants(session, limit=page.limit, after=page.after)
    except UnknownCursor:
        raise unknown_cursor(page.after or "") from None
    return TenantList(data=[TenantOut(**tenant_out(t)) for t in rows.items],
                      **page_fields([t.id for t in rows.items], rows.has_more))


@router.patch("/tenants/{tenant_id}", response_model=TenantOut, responses=error_responses(400, 401, 404, 422))
def patch_limits(tenant_id: str, body: TenantLimitsPatch, session: SessionDep) -> TenantOut:
    """Change a tenant's limits: the fields given (null: the server's default), from its next request."""
    if not plausible_id(tenant_id):
        raise not_found(f"tenant {tenant_id!r} not found", code="tenant_not_found")
    try:
        tenant = set_tenant_limits(session, tenant_id=tenant_id,
                                   limits={k: getattr(body, k) for k in body.model_fields_set})
        session.commit()
    except TenantNotFound as exc:
        raise not_found(str(exc), code="tenant_not_found") from None
    return TenantOut(**tenant_out(tenant))


@router.post("/tenants/{tenant_id}/rotate-key", response_model=TenantKey, responses=error_responses(401, 404))
def rotate(tenant_id: str, session: SessionDep) -> TenantKey:
    if not plausible_id(tenant_id):
        raise not_found(f"tenant {tenant_id!r} not found", code="tenant_not_found")
    try:
        api_key = rotate_key(session, tenant_id=tenant_id)
        tenant = get_tenant(session, tenant_id=tenant_id)
        session.commit()
    except TenantNotFound as exc:
        raise not_found(str(exc), code="tenant_not_found") from None
    return TenantKey(id=tenant.id, name=tenant.name, api_key=api_key)

"""``GET /v1/models``: the base model and the tenant's adapters (latest version of each name)."""
from __future__ import annotations

from fastapi import APIRouter

from promptfleet.adapters.errors import AdapterNotFound
from promptfleet.adapters.models import AdapterVersion
from promptfleet.adapters.service import page_adapters, resolve_adapter
from promptfleet.api.deps import LimitedTenantDep, SessionDep, StateDep
from promptfleet.api.errors import APIError
from promptfleet.api.pagination import OptionalPageDep, page_fields, unknown_cursor
from promptfleet.api.responses import error_responses
from promptfleet.api.schemas import ModelCard, ModelList
from promptfleet.api.state import AppState
from promptfleet.paging import UnknownCursor
from promptfleet.tenants.models import Tenant

router = APIRouter(prefix="/v1/models", tags=["models"])


def _base_card(state: AppState) -> ModelCard:
    return ModelCard(id=state.settings.model_id, created=int(state.started_at), owned_by="promptfleet")


def _adapter_card(row: AdapterVersion, tenant: Tenant) -> ModelCard:
    return ModelCard(id=row.name, created=int(row.created_at.timestamp()), owned_by=tenant.name)


@router.get("", response_model=ModelList, responses=error_responses(400, 401, 422, 429))
def list_models(tenant: LimitedTenantDep, state: StateDep, session: SessionDep, page: OptionalPageDep) -> ModelList:
    """The base model, then the tenant's adapters by name. Without ``limit``, all of them in
    one answer, as OpenAI's (whose clients never ask for a second page); ``after`` is a
    model id of an earlier page."""
    limit, after = page
    model_id = state.settings.model_id
    cards = [_base_card(state)] if after is None else []
    if limit is not None:
        limit -= len(cards)
    try:
        rows = page_adapters(session, tenant_id=tenant.id, limit=limit,
                             after=None if after in (None, model_id) else after)
    except UnknownCursor:
        raise unknown_cursor(after or "") from None
    cards += [_adapter_card(row, tenant) for row in rows.items if row.name != model_id]
    return ModelList(data=cards, **page_fields([c.id for c in cards], rows.has_more))


@router.get("/{model}", response_model=ModelCard, responses=error_responses(401, 404, 429))
def get_model(model: str, tenant: LimitedTenantDep, state: StateDep, session: SessionDep) -> ModelCard:
    if model == state.settings.model_id:
        return _base_card(state)
    try:
        row = resolve_adapter(session, tenant_id=tenant.id, ref=model)
    except AdapterNotFound:
        raise APIError(404, f"the model {model!r} does not exist", code="model_not_found", param="model") from None
    return ModelCard(id=model, created=int(row.created_at.timestamp()), owned_by=tenant.name)

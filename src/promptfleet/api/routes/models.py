"""``GET /v1/models``: the base model and the tenant's adapters (latest version of each name)."""
from __future__ import annotations

from fastapi import APIRouter

from promptfleet.adapters.errors import AdapterNotFound
from promptfleet.adapters.service import list_adapters, resolve_adapter
from promptfleet.api.deps import LimitedTenantDep, SessionDep, StateDep
from promptfleet.api.errors import APIError
from promptfleet.api.responses import error_responses
from promptfleet.api.schemas import ModelCard, ModelList
from promptfleet.api.state import AppState

router = APIRouter(prefix="/v1/models", tags=["models"])


def _base_card(state: AppState) -> ModelCard:
    return ModelCard(id=state.settings.model_id, created=int(state.started_at), owned_by="promptfleet")


@router.get("", response_model=ModelList, responses=error_responses(401, 429))
def list_models(tenant: LimitedTenantDep, state: StateDep, session: SessionDep) -> ModelList:
    cards = [_base_card(state)]
    cards += [ModelCard(id=row.name, created=int(row.created_at.timestamp()), owned_by=tenant.name)
              for row in list_adapters(session, tenant_id=tenant.id) if row.name != state.settings.model_id]
    return ModelList(data=cards)


@router.get("/{model}", response_model=ModelCard, responses=error_responses(401, 404, 429))
def get_model(model: str, tenant: LimitedTenantDep, state: StateDep, session: SessionDep) -> ModelCard:
    if model == state.settings.model_id:
        return _base_card(state)
    try:
        row = resolve_adapter(session, tenant_id=tenant.id, ref=model)
    except AdapterNotFound:
        raise APIError(404, f"the model {model!r} does not exist", code="model_not_found", param="model") from None
    return ModelCard(id=model, created=int(row.created_at.timestamp()), owned_by=tenant.name)

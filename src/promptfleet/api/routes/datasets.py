"""``/v1/datasets``: upload a JSONL training set (``{"prompt","completion"}`` per line),
list and get them. A refused file names its bad line; another tenant's dataset is 404."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from promptfleet.api.deps import LimitedTenantDep, SessionDep, StateDep, plausible_id
from promptfleet.api.errors import bad_request, not_found, too_large
from promptfleet.api.pagination import PageDep, page_fields, unknown_cursor
from promptfleet.api.quotas import check_storage_quota
from promptfleet.api.responses import error_responses
from promptfleet.api.schemas import DatasetList, DatasetOut
from promptfleet.api.uploads import read_upload
from promptfleet.trainer.datasets import DatasetError, DatasetLimits
from promptfleet.trainer.models import Dataset
from promptfleet.paging import UnknownCursor
from promptfleet.trainer.service import DatasetTooLarge, NotFound, create_dataset, get_dataset, page_datasets

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


def dataset_out(row: Dataset) -> DatasetOut:
    return DatasetOut(id=row.id, num_examples=row.num_examples, num_tokens=row.num_tokens, size_bytes=row.size_bytes,
                      sha256=row.sha256, created_at=row.created_at)


@router.post("", status_code=201, response_model=DatasetOut,
             responses=error_responses(400, 401, 403, 413, 422, 429))
def upload_dataset(tenant: LimitedTenantDep, state: StateDep, session: SessionDep,
                   file: Annotated[UploadFile, File(description='JSONL: one {"prompt", "completion"} per line')]
                   ) -> DatasetOut:
    limits = DatasetLimits.from_settings(state.settings)
    data = read_upload(file, limit=limits.max_bytes, what="the dataset")
    check_storage_quota(session, tenant_id=tenant.id, adding=len(data), limit_mb=state.settings.tenant_max_storage_mb)
    try:
        row = create_dataset(session, storage=state.storage, tenant_id=tenant.id, data=data,
                             tokenizer=state.engine.tokenizer, limits=limits)
    except DatasetError as exc:
        raise bad_request(f"dataset refused: {exc}", code="invalid_dataset", param="file") from None
    except DatasetTooLarge as exc:
        raise too_large(str(exc)) from None
    return dataset_out(row)


@router.get("", response_model=DatasetList, responses=error_responses(400, 401, 422, 429))
def get_datasets(tenant: LimitedTenantDep, session: SessionDep, page: PageDep) -> DatasetList:
    """The tenant's datasets, newest first."""
    if page.after is not None and not plausible_id(page.after):
        raise unknown_cursor(page.after)
    try:
        rows = page_datasets(session, tenant_id=tenant.id, limit=page.limit, after=page.after)
    except UnknownCursor:
        raise unknown_cursor(page.after or "") from None
    return DatasetList(data=[dataset_out(r) for r in rows.items],
                       **page_fields([r.id for r in rows.items], rows.has_more))


@router.get("/{dataset_id}", response_model=DatasetOut, responses=error_responses(401, 404, 429))
def get_one_dataset(dataset_id: str, tenant: LimitedTenantDep, session: SessionDep) -> DatasetOut:
    if not plausible_id(dataset_id):
        raise not_found(f"dataset {dataset_id!r} not found", code="dataset_not_found")
    try:
        return dataset_out(get_dataset(session, tenant_id=tenant.id, dataset_id=dataset_id))
    except NotFound as exc:
        raise not_found(str(exc), code="dataset_not_found") from None

"""``/v1/adapters``: upload (zip or tar.gz of a PEFT folder, optionally with a
``generation_config.json`` of decoding defaults), list, get, set defaults (PATCH), download, delete.
``{name}`` is ``name`` (latest version) or ``name@N``; another tenant's adapter is 404."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from promptfleet.adapters.archive import ArchiveLimits
from promptfleet.adapters.errors import AdapterConflict, AdapterNotFound, AdapterRejected, InvalidAdapterName
from promptfleet.adapters.models import AdapterVersion
from promptfleet.adapters.service import (delete_adapter, export_adapter, import_adapter, page_adapters,
                                          resolve_adapter, set_generation_defaults)
from promptfleet.adapters.storage import BlobNotFoundError, CorruptBlobError
from promptfleet.api.deps import LimitedTenantDep, SessionDep, StateDep
from promptfleet.api.errors import APIError, bad_request, not_found
from promptfleet.api.pagination import PageDep, page_fields, unknown_cursor
from promptfleet.api.quotas import check_storage_quota
from promptfleet.api.responses import error_responses
from promptfleet.api.schemas import AdapterList, AdapterOut, AdapterPatch
from promptfleet.api.uploads import read_upload
from promptfleet.paging import UnknownCursor

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


def adapter_out(row: AdapterVersion) -> AdapterOut:
    return AdapterOut(id=row.ref, name=row.name, version=row.version, peft_type=row.peft_type,
                      num_virtual_tokens=row.num_virtual_tokens, sha256=row.sha256, size_bytes=row.size_bytes,
                      created_at=row.created_at, generation_defaults=row.generation_defaults)


def _missing(exc: AdapterNotFound) -> APIError:
    return not_found(str(exc), code="adapter_not_found")


@router.post("", status_code=201, response_model=AdapterOut,
             responses=error_responses(400, 401, 403, 409, 413, 422, 429))
def upload_adapter(tenant: LimitedTenantDep, state: StateDep, session: SessionDep,
                   name: Annotated[str, Form(description="Adapter name; uploading it again adds a version.")],
                   file: Annotated[UploadFile, File(description="zip or tar.gz of a PEFT save_pretrained folder")]
                   ) -> AdapterOut:
    limit = state.settings.max_upload_mb << 20
    archive = read_upload(file, limit=limit, what="the adapter archive")
    check_storage_quota(session, tenant_id=tenant.id, adding=len(archive),
                        limit_mb=state.settings.tenant_max_storage_mb)
    try:
        row = import_adapter(session, storage=state.storage, tenant_id=tenant.id, name=name, archive=archive,
                             model_config=state.engine.model_config, limits=ArchiveLimits(max_archive_bytes=limit),
                             check=state.engine.check_adapter)
        session.commit()
    except InvalidAdapterName as exc:
        raise bad_request(str(exc), code="invalid_adapter_name", param="name") from None
    except AdapterRejected as exc:
        raise bad_request(f"adapter refused: {exc}", code="adapter_rejected", param="file") from None
    except AdapterConflict as exc:
        raise APIError(409, str(exc), code="conflict") from None
    return adapter_out(row)


@router.get("", response_model=AdapterList, responses=error_responses(400, 401, 422, 429))
def get_adapters(tenant: LimitedTenantDep, session: SessionDep, page: PageDep) -> AdapterList:
    """The latest version of each adapter name, by name; ``after`` is an item's ``id``."""
    try:
        rows = page_adapters(session, tenant_id=tenant.id, limit=page.limit, after=page.after)
    except UnknownCursor:
        raise unknown_cursor(page.after or "") from None
    data = [adapter_out(r) for r in rows.items]
    return AdapterList(data=data, **page_fields([a.id for a in data], rows.has_more))


@router.get("/{name}", response_model=AdapterOut, responses=error_responses(401, 404, 429))
def get_adapter(name: str, tenant: LimitedTenantDep, session: SessionDep) -> AdapterOut:
    try:
        return adapter_out(resolve_adapter(session, tenant_id=tenant.id, ref=name))
    except AdapterNotFound as exc:
        raise _missing(exc) from None


@router.patch("/{name}", response_model=AdapterOut, responses=error_responses(400, 401, 404, 422, 429))
def patch_adapter(name: str, body: AdapterPatch, tenant: LimitedTenantDep, session: SessionDep) -> AdapterOut:
    """Set the decoding defaults of ``name`` (its latest version) or ``name@N``: requests naming
    that version take them for the sampling fields they leave unset."""
    try:
        row = set_generation_defaults(session, tenant_id=tenant.id, ref=name, defaults=body.generation_defaults)
        session.commit()
    except AdapterNotFound as exc:
        raise _missing(exc) from None
    return adapter_out(row)


@router.get("/{name}/download", response_class=Response,
            responses={200: {"content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
                             "description": "zip of a PEFT adapter folder"}, **error_responses(401, 404, 429)})
def download_adapter(name: str, tenant: LimitedTenantDep, state: StateDep, session: SessionDep) -> Response:
    try:
        row = resolve_adapter(session, tenant_id=tenant.id, ref=name)
        data = export_adapter(session, storage=state.storage, tenant_id=tenant.id, ref=row.ref)
    except AdapterNotFound as exc:
        raise _missing(exc) from None
    except (BlobNotFoundError, CorruptBlobError) as exc:
        raise APIError(500, f"adapter {name!r} cannot be read from storage: {exc}", code="storage_error") from None
    filename = f"{row.name}-v{row.version}.zip"
    return Response(content=data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.delete("/{name}", status_code=204, response_class=Response,
               responses=error_responses(401, 404, 429))
def remove_adapter(name: str, tenant: LimitedTenantDep, session: SessionDep) -> Response:
    try:
        delete_adapter(session, tenant_id=tenant.id, name=name)
        session.commit()
    except AdapterNotFound as exc:
        raise _missing(exc) from None
    return Response(status_code=204)

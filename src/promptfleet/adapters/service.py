"""The adapter registry: import, register, list, resolve, delete and export adapter versions.

Functions take the caller's session and only flush: the caller owns the transaction
(``promptfleet.db.session_scope``). Order of a write: validate everything, then put the
blob, then insert the row, so a refused upload leaves neither a row nor a blob.
"""
from __future__ import annotations

from collections.abc import Callable

import json
import logging
import re
import uuid

from sqlalchemy import and_, func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from promptfleet.adapters.archive import (ArchiveError, ArchiveLimits, BackboneBounds, read_adapter_archive,
                                          read_adapter_files, write_adapter_zip)
from promptfleet.adapters.errors import (AdapterConflict, AdapterIncompatible, AdapterNotFound, AdapterRejected,
                                         InvalidAdapterName)
from promptfleet.adapters.fingerprint import model_fingerprint
from promptfleet.adapters.generation_defaults import (GenerationDefaults, InvalidGenerationDefaults,
                                                      parse_generation_config, validate_defaults)
from promptfleet.adapters.models import AdapterVersion
from promptfleet.adapters.storage import BlobStorage, sha256_hex
from promptfleet.db import utcnow
from promptfleet.paging import Page, SortKey, UnknownCursor, fetch_page
from promptfleet.platform.adapter import AdapterError, AdapterWeights, check_fits, parse_adapter_files
from promptfleet.platform.config import ModelConfig
from promptfleet.tenants.models import Tenant
from promptfleet.tenants.service import TenantNotFound, lock_tenant

log = logging.getLogger(__name__)

ADAPTER_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}$")
_INSERT_ATTEMPTS = 3


def validate_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name):
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1 to 64 characters from letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (no '@' or '/')")
    return name


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``name`` -> (name, None); ``name@3`` -> (name, 3). Raises ``AdapterNotFound`` for a
    reference no adapter can have."""
    name, sep, ver = ref.partition("@") if isinstance(ref, str) else ("", "", "")
    if not ADAPTER_NAME_RE.fullmatch(name):
        raise AdapterNotFound(f"adapter {ref!r} not found (not a valid adapter name)")
    if not sep:
        return name, None
    if not ver.isascii() or not ver.isdigit() or int(ver) < 1 or len(ver) > 9:
        raise AdapterNotFound(f"adapter {ref!r} not found (the version after '@' must be a positive integer)")
    return name, int(ver)


def cache_key(version: AdapterVersion) -> str:
    """Device-cache key of a version's KV prefix: same weights on the same backbone share it."""
    return f"{version.sha256}:{version.base_fingerprint}"


def split_cache_key(key: str) -> tuple[str, str]:
    """``(adapter sha256, backbone fingerprint)`` of a ``cache_key``."""
    sha256, _, base = key.partition(":")
    return sha256, base


# Runs an adapter on the serving backbone and raises ``AdapterError`` when it cannot be
# served (``Engine.check_adapter``: values that overflow, non-finite keys/values).
AdapterCheck = Callable[[AdapterWeights], None]


def _validated(config_bytes: bytes, safetensors_bytes: bytes, model_config: ModelConfig,
               check: AdapterCheck | None = None) -> AdapterWeights:
    try:
        weights = parse_adapter_files(config_bytes, safetensors_bytes)
        check_fits(weights, model_config)
        if check is not None:
            check(weights)
    except AdapterError as exc:
        raise AdapterRejected(str(exc)) from exc
    except RecursionError:  # adapter_config.json nested too deeply for the JSON parser
        raise AdapterRejected("adapter_config.json is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit limit
        raise AdapterRejected(f"adapter files cannot be parsed: {str(exc)[:200]}") from None
    return weights


def _require_tenant(session: Session, tenant_id: str) -> None:
    if session.get(Tenant, tenant_id) is None:
        raise TenantNotFound(f"tenant {tenant_id!r} not found")


def _by_job(session: Session, source_job_id: str) -> AdapterVersion | None:
    return session.scalar(select(AdapterVersion).where(AdapterVersion.source_job_id == source_job_id))


def _next_version(session: Session, *, tenant_id: str, name: str) -> int:
    """max(version) + 1 over every row of the name, deleted ones included: numbers are never reused."""
    top = session.scalar(select(func.max(AdapterVersion.version))
                         .where(AdapterVersion.tenant_id == tenant_id, AdapterVersion.name == name))
    return (top or 0) + 1


def _insert_version(session: Session, *, fields: dict, tenant_id: str, name: str,
                    source_job_id: str | None) -> AdapterVersion:
    lock_tenant(session, tenant_id=tenant_id)  # the unique constraint plus a retry covers the rest
    for attempt in range(1, _INSERT_ATTEMPTS + 1):
        version = _next_version(session, tenant_id=tenant_id, name=name)
        row = AdapterVersion(id=uuid.uuid4().hex, tenant_id=tenant_id, name=name, version=version,
                             source_job_id=source_job_id, created_at=utcnow(), **fields)
        try:
            with session.begin_nested():
                session.add(row)
        except IntegrityError:
            if source_job_id is not None and (existing := _by_job(session, source_job_id)) is not None:
                return existing
            log.info("version %d of adapter %s was taken concurrently (attempt %d)", version, name, attempt)
            continue
        return row
    raise AdapterConflict(f"could not allocate a version of adapter {name!r}: concurrent uploads kept taking it; "
                          "try again")


def _delete_blob_if_unreferenced(session: Session, storage: BlobStorage, sha256: str) -> None:
    try:
        referenced = session.scalar(select(AdapterVersion.id).where(AdapterVersion.sha256 == sha256).limit(1))
    except SQLAlchemyError:
        log.warning("cannot check references of blob %s; keeping it", sha256)
        return
    if referenced is None:
        storage.delete(sha256)


def _store(session: Session, *, storage: BlobStorage, tenant_id: str, name: str, weights: AdapterWeights,
           blob: bytes, model_config: ModelConfig, source_job_id: str | None,
           generation_defaults: dict | None = None) -> AdapterVersion:
    sha256 = sha256_hex(blob)
    existed = storage.exists(sha256)
    storage.put(blob)
    fields = dict(peft_type=weights.peft_type, num_virtual_tokens=weights.num_virtual_tokens,
                  shapes={"prompt_embeddings": list(weights.prompt_embeddings.shape)},
                  base_fingerprint=model_fingerprint(model_config), sha256=sha256, size_bytes=len(blob),
                  generation_defaults=generation_defaults or None)
    try:
        row = _insert_version(session, fields=fields, tenant_id=tenant_id, name=name, source_job_id=source_job_id)
    except BaseException:
        if not existed:
            _delete_blob_if_unreferenced(session, storage, sha256)
        raise
    if row.sha256 != sha256 and not existed:  # a concurrent registration of the same job won
        _delete_blob_if_unreferenced(session, storage, sha256)
    log.info("stored adapter %s for tenant %s (%s, %d virtual tokens, sha256 %s)", row.ref, tenant_id,
             row.peft_type, row.num_virtual_tokens, row.sha256[:12])
    return row


def import_adapter(session: Session, *, storage: BlobStorage, tenant_id: str, name: str, archive: bytes,
                   model_config: ModelConfig, limits: ArchiveLimits | None = None,
                   check: AdapterCheck | None = None) -> AdapterVersion:
    """Validate an uploaded zip/tar.gz of a PEFT adapter folder and store it as the next
    version of ``name``. Raises ``AdapterRejected`` (nothing stored) when it is refused."""
    validate_adapter_name(name)
    try:
        files = read_adapter_files(archive, limits=limits or ArchiveLimits(), backbone=BackboneBounds.of(model_config))
    except ArchiveError as exc:
        raise AdapterRejected(str(exc)) from exc
    weights = _validated(files.config, files.weights, model_config, check)
    defaults = None
    if files.generation_config is not None:
        try:
            defaults = parse_generation_config(files.generation_config).as_dict()
        except InvalidGenerationDefaults as exc:
            raise AdapterRejected(str(exc)) from exc
    _require_tenant(session, tenant_id)
    return _store(session, storage=storage, tenant_id=tenant_id, name=name, weights=weights,
                  blob=write_adapter_zip(files.config, files.weights), model_config=model_config,
                  source_job_id=None, generation_defaults=defaults)


def set_generation_defaults(session: Session, *, tenant_id: str, ref: str,
                            defaults: GenerationDefaults | None) -> AdapterVersion:
    """Replace the decoding defaults of the version ``ref`` names (``name``: the latest);
    None clears them. ``AdapterNotFound`` for another tenant's or a deleted version."""
    row = resolve_adapter(session, tenant_id=tenant_id, ref=ref)
    row.generation_defaults = None if defaults is None else (defaults.as_dict() or None)
    session.flush()
    log.info("adapter %s of tenant %s: generation defaults %s", row.ref, tenant_id, row.generation_defaults)
    return row


def register_adapter(session: Session, *, storage: BlobStorage, tenant_id: str, name: str, config: dict,
                     safetensors_bytes: bytes, model_config: ModelConfig,
                     source_job_id: str | None = None, generation_defaults: dict | None = None) -> AdapterVersion:
    """Register an adapter produced in-process (the trainer), with the decoding defaults its
    job tuned, if any. Idempotent on ``source_job_id``: registering the same job again returns
    the version it registered the first time."""
    validate_adapter_name(name)
    if source_job_id is not None and (existing := _by_job(session, source_job_id)) is not None:
        if existing.tenant_id != tenant_id:
            raise AdapterRejected(f"training job {source_job_id!r} already registered an adapter for another tenant")
        return existing
    if not isinstance(config, dict):
        raise AdapterRejected("adapter config must be a JSON object (dict)")
    config_bytes = json.dumps(config, indent=2, sort_keys=True).encode("utf-8")
    weights = _validated(config_bytes, safetensors_bytes, model_config)
    _require_tenant(session, tenant_id)
    defaults = None if generation_defaults is None else validate_defaults(generation_defaults).as_dict()
    return _store(session, storage=storage, tenant_id=tenant_id, name=name, weights=weights,
                  blob=write_adapter_zip(config_bytes, safetensors_bytes), model_config=model_config,
                  source_job_id=source_job_id, generation_defaults=defaults)


def _live(tenant_id: str, name: str):
    return and_(AdapterVersion.tenant_id == tenant_id, AdapterVersion.name == name,
                AdapterVersion.deleted_at.is_(None))


def _latest_versions(tenant_id: str):
    """SELECT of the latest live version of each of the tenant's adapter names (unordered)."""
    latest = (select(AdapterVersion.name, func.max(AdapterVersion.version).label("version"))
              .where(AdapterVersion.tenant_id == tenant_id, AdapterVersion.deleted_at.is_(None))
              .group_by(AdapterVersion.name).subquery())
    return (select(AdapterVersion)
            .join(latest, and_(AdapterVersion.name == latest.c.name, AdapterVersion.version == latest.c.version))
            .where(AdapterVersion.tenant_id == tenant_id))


def list_adapters(session: Session, *, tenant_id: str) -> list[AdapterVersion]:
    """The latest live version of each of the tenant's adapter names, by name."""
    return list(session.scalars(_latest_versions(tenant_id).order_by(AdapterVersion.name)))


def page_adapters(session: Session, *, tenant_id: str, limit: int | None,
                  after: str | None = None) -> Page[AdapterVersion]:
    """``limit`` (None: all) of ``list_adapters``' rows (by name) after the cursor ``after``:
    an item's id (``name@N``) or name. ``UnknownCursor`` unless the tenant has (or had:
    deleted versions count, so a deletion between two pages does not break the walk) that
    name."""
    cursor = None
    if after is not None:
        try:
            name, _ = parse_ref(after)
        except AdapterNotFound:
            raise UnknownCursor(f"unknown cursor {after!r}") from None
        known = select(AdapterVersion.id).where(AdapterVersion.tenant_id == tenant_id, AdapterVersion.name == name)
        if session.scalar(known.limit(1)) is None:
            raise UnknownCursor(f"unknown cursor {after!r}")
        cursor = (name,)
    return fetch_page(session, _latest_versions(tenant_id), keys=[SortKey(AdapterVersion.name)], after=cursor,
                      limit=limit)


def list_versions(session: Session, *, tenant_id: str, name: str) -> list[AdapterVersion]:
    """Every live version of ``name``, oldest first (empty when there is none)."""
    stmt = select(AdapterVersion).where(_live(tenant_id, name)).order_by(AdapterVersion.version)
    return list(session.scalars(stmt))


def resolve_adapter(session: Session, *, tenant_id: str, ref: str,
                    model_config: ModelConfig | None = None) -> AdapterVersion:
    """``name`` (latest live version) or ``name@N`` of this tenant. Raises ``AdapterNotFound``
    -- the same for another tenant's adapter -- and, given the serving ``model_config``,
    ``AdapterIncompatible`` for an adapter made for another backbone."""
    name, version = parse_ref(ref)
    stmt = select(AdapterVersion).where(_live(tenant_id, name))
    if version is None:
        stmt = stmt.order_by(AdapterVersion.version.desc()).limit(1)
    else:
        stmt = stmt.where(AdapterVersion.version == version)
    row = session.scalar(stmt)
    if row is None:
        raise AdapterNotFound(f"adapter {ref!r} not found")
    if model_config is not None and row.base_fingerprint != (serving := model_fingerprint(model_config)):
        raise AdapterIncompatible(f"adapter {row.ref!r} was made for base model {row.base_fingerprint}, "
                                  f"but this server runs {serving}")
    return row


def delete_adapter(session: Session, *, tenant_id: str, name: str) -> int:
    """Soft-delete every version of ``name`` (or only version N for ``name@N``); returns how
    many versions were deleted. Version numbers are never reused."""
    base, version = parse_ref(name)
    cond = _live(tenant_id, base)
    if version is not None:
        cond = and_(cond, AdapterVersion.version == version)
    result = session.execute(update(AdapterVersion).where(cond).values(deleted_at=utcnow())
                             .execution_options(synchronize_session="fetch"))
    if not result.rowcount:
        raise AdapterNotFound(f"adapter {name!r} not found")
    session.flush()
    log.info("deleted %d version(s) of adapter %s for tenant %s", result.rowcount, name, tenant_id)
    return result.rowcount


def export_adapter(session: Session, *, storage: BlobStorage, tenant_id: str, ref: str) -> bytes:
    """A zip of the PEFT adapter folder (``PeftModel.from_pretrained`` loads it once extracted)."""
    return storage.get(resolve_adapter(session, tenant_id=tenant_id, ref=ref).sha256)


def load_adapter_weights(*, storage: BlobStorage, version: AdapterVersion) -> AdapterWeights:
    """Read a version's blob (sha256 verified by the storage) and parse its weights."""
    blob = storage.get(version.sha256)
    limits = ArchiveLimits(max_archive_bytes=len(blob), max_total_bytes=len(blob) + (2 << 20),
                           max_file_bytes=len(blob) + (2 << 20))
    try:
        config_bytes, safetensors_bytes = read_adapter_archive(blob, limits=limits)
        return parse_adapter_files(config_bytes, safetensors_bytes)
    except (ArchiveError, AdapterError) as exc:  # only if what we stored was unreadable
        raise AdapterRejected(f"stored adapter {version.ref!r} cannot be read: {exc}") from exc

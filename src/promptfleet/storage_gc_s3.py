"""Garbage collection in an S3 bucket (``promptfleet gc`` with ``PROMPTFLEET_BLOB_URL=s3://``).

S3 has no atomic rename, so a blob is never deleted in the run that finds it unreferenced:

1. ``blobs/<sha256>`` that no live adapter version or dataset refers to, and older than
   ``min_age_s``, is copied to ``trash/<sha256>`` and deleted from ``blobs/`` (its
   liveness checked again just before). An upload of the same bytes racing this either
   found no blob (and wrote a new one) or found it and will commit a row pointing at it:
   ``S3BlobStorage.get`` then reads the trash copy and puts it back.
2. ``trash/<sha256>`` that a row points to again is put back; one older than
   ``min_age_s`` and still unreferenced is deleted: only now are its bytes gone.
3. shared KV prefixes (``prefixes/<adapter sha256>/...``, a cache: a missing one is
   rebuilt) of adapters no live version refers to, older than ``min_age_s``, are deleted.

Blob bytes are counted as freed in the run that moves them to the trash.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from sqlalchemy.orm import Session, sessionmaker

from promptfleet.adapters.s3_objects import S3Objects
from promptfleet.adapters.s3_storage import BLOBS, PREFIXES, TRASH
from promptfleet.adapters.storage import SHA256_RE
from promptfleet.storage_gc import GcReport, _is_live, live_digests

log = logging.getLogger(__name__)


def _age_s(when: datetime) -> float:
    return (datetime.now(timezone.utc) - when).total_seconds()


def _sweep_blobs(factory: sessionmaker[Session], objects: S3Objects, live: set[str], min_age_s: float,
                 report: GcReport) -> None:
    for info in list(objects.list(BLOBS)):
        sha256 = info.key[len(BLOBS):]
        if not SHA256_RE.fullmatch(sha256) or sha256 in live:
            continue
        if _age_s(info.last_modified) < min_age_s:
            report.kept_recent += 1
            continue
        if not report.dry_run:
            if _is_live(factory, sha256):  # a row committed since the listing
                continue
            if not objects.copy(info.key, TRASH + sha256):
                continue  # gone meanwhile
            objects.delete(info.key)
        report.blobs_deleted += 1
        report.blob_bytes_freed += info.size


def _sweep_trash(factory: sessionmaker[Session], objects: S3Objects, min_age_s: float, report: GcReport) -> None:
    for info in list(objects.list(TRASH)):
        sha256 = info.key[len(TRASH):]
        if not SHA256_RE.fullmatch(sha256):
            continue
        if _is_live(factory, sha256):  # set aside while an upload of the same bytes committed its row
            report.trash_restored += 1
            if not report.dry_run:
                if objects.head(BLOBS + sha256) is None:
                    objects.copy(info.key, BLOBS + sha256)
                objects.delete(info.key)
        elif _age_s(info.last_modified) >= min_age_s:
            report.trash_purged += 1
            if not report.dry_run:
                objects.delete(info.key)


def _sweep_prefixes(objects: S3Objects, live: set[str], min_age_s: float, report: GcReport) -> None:
    for info in list(objects.list(PREFIXES)):
        adapter_sha = info.key[len(PREFIXES):].split("/", 1)[0]
        if adapter_sha in live:
            continue
        if _age_s(info.last_modified) < min_age_s:
            report.kept_recent += 1
            continue
        report.prefixes_deleted += 1
        report.prefix_bytes_freed += info.size
        if not report.dry_run:
            objects.delete(info.key)


def collect_s3_garbage(factory: sessionmaker[Session], objects: S3Objects, *, min_age_s: float = 3600.0,
                       dry_run: bool = False) -> GcReport:
    """Collect the bucket's blobs, trash and shared prefixes; raises ``StorageUnavailable``
    when the store cannot be reached (nothing is half-done: each step stands alone)."""
    report = GcReport(dry_run=dry_run)
    with factory() as session:
        live = live_digests(session)
    _sweep_trash(factory, objects, min_age_s, report)  # first: what this run sets aside waits a whole min_age
    _sweep_blobs(factory, objects, live, min_age_s, report)
    _sweep_prefixes(objects, live, min_age_s, report)
    log.info("storage gc of %s%s: %s", objects.location, " (dry run)" if dry_run else "", report)
    return report

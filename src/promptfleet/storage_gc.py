"""Garbage collection of stored bytes that nothing live refers to.

Deleting an adapter version only marks its row (``deleted_at``): its blob and its stored
KV prefixes stay on disk. ``collect_garbage`` (CLI: ``promptfleet gc``) removes

- blobs (content-addressed, shared by equal uploads) whose sha256 no live adapter version
  and no dataset refers to;
- stored KV prefixes (a cache: a missing one is rebuilt) of such adapters;
- temp files that a crashed write left behind;

each only when untouched for ``min_age_s``. With ``PROMPTFLEET_BLOB_URL=s3://...`` the
bucket's blobs and shared prefixes are collected by ``promptfleet.storage_gc_s3`` (and
this host's prefix dir here); ``collect_for_settings`` picks what the settings name.

Local directory: it is safe while the server runs: a blob is
first renamed aside, then kept if, looked at again, it is live or was touched meanwhile
(``LocalBlobStorage.put`` touches an existing blob before reusing it, so an upload of the
same bytes racing the sweep keeps it), and only then unlinked.
"""
from __future__ import annotations

import json
import logging
import os
import struct
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from promptfleet.adapters.models import AdapterVersion
from promptfleet.trainer.models import Dataset

if TYPE_CHECKING:
    from promptfleet.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    blobs_deleted: int = 0
    blob_bytes_freed: int = 0
    prefixes_deleted: int = 0
    prefix_bytes_freed: int = 0
    temp_files_deleted: int = 0
    kept_recent: int = 0   # unreferenced, but touched within min_age_s
    trash_purged: int = 0  # S3: blobs set aside by an earlier run, deleted now
    trash_restored: int = 0  # S3: blobs set aside that a row points to again, put back
    dry_run: bool = False

    def add(self, other: "GcReport") -> "GcReport":
        for name in ("blobs_deleted", "blob_bytes_freed", "prefixes_deleted", "prefix_bytes_freed",
                     "temp_files_deleted", "kept_recent", "trash_purged", "trash_restored"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self


def live_digests(session: Session) -> set[str]:
    adapters = session.scalars(select(AdapterVersion.sha256).where(AdapterVersion.deleted_at.is_(None)))
    return set(adapters) | set(session.scalars(select(Dataset.sha256)))


def _is_live(factory: sessionmaker[Session], sha256: str) -> bool:
    """Whether a live adapter version or a dataset refers to this one blob now."""
    with factory() as session:
        adapter = select(AdapterVersion.id).where(AdapterVersion.sha256 == sha256, AdapterVersion.deleted_at.is_(None))
        dataset = select(Dataset.id).where(Dataset.sha256 == sha256)
        return session.scalar(adapter.limit(1)) is not None or session.scalar(dataset.limit(1)) is not None


def _old(path: Path, min_age_s: float, now: float) -> bool:
    return now - path.stat().st_mtime >= min_age_s


def collect_garbage(factory: sessionmaker[Session], *, blob_root: Path | None, prefix_root: Path | None,
                    min_age_s: float = 3600.0, dry_run: bool = False) -> GcReport:
    """Collect a local blob directory (None: blobs live elsewhere) and a local prefix dir."""
    report = GcReport(dry_run=dry_run)
    now = time.time()
    with factory() as session:
        live = live_digests(session)
    for path in sorted(blob_root.glob("??/*")) if blob_root is not None else ():
        if not path.is_file():
            continue
        if path.name.startswith((".tmp-", ".gc-")):  # a crashed write, or a crashed sweep
            _drop_temp(path, min_age_s, now, report, dry_run)
            continue
        sha256 = path.parent.name + path.name
        if sha256 in live or len(sha256) != 64:
            continue
        if not _old(path, min_age_s, now):
            report.kept_recent += 1
            continue
        size = path.stat().st_size
        if dry_run or _remove_blob(factory, path, sha256, min_age_s):
            report.blobs_deleted += 1
            report.blob_bytes_freed += size
        else:
            report.kept_recent += 1
    if prefix_root is not None and prefix_root.is_dir():
        for path in sorted(prefix_root.glob("??/*")):
            if path.name.startswith(".tmp-"):
                _drop_temp(path, min_age_s, now, report, dry_run)
                continue
            key = _prefix_key(path)
            if key is not None and key.split(":", 1)[0] in live:
                continue
            if not _old(path, min_age_s, now):
                report.kept_recent += 1
                continue
            report.prefixes_deleted += 1
            report.prefix_bytes_freed += path.stat().st_size
            if not dry_run:
                path.unlink(missing_ok=True)
    log.info("storage gc%s: %s", " (dry run)" if dry_run else "", report)
    return report


def collect_for_settings(factory: sessionmaker[Session], settings: "Settings", *, min_age_s: float = 3600.0,
                         dry_run: bool = False) -> GcReport:
    """``promptfleet gc``: the blob store ``settings.blob_url`` names (a directory or an S3
    bucket with its shared prefixes), and this host's prefix dir."""
    from promptfleet.adapters.blob_url import FileLocation, parse_blob_url

    location = parse_blob_url(settings.blob_url, default_root=settings.blob_dir)
    if isinstance(location, FileLocation):
        return collect_garbage(factory, blob_root=location.root, prefix_root=settings.prefix_dir,
                               min_age_s=min_age_s, dry_run=dry_run)
    from promptfleet.adapters.s3_objects import S3Config, S3Objects
    from promptfleet.storage_gc_s3 import collect_s3_garbage

    report = collect_s3_garbage(factory, S3Objects(location, S3Config.from_env()), min_age_s=min_age_s,
                                dry_run=dry_run)
    return report.add(collect_garbage(factory, blob_root=None, prefix_root=settings.prefix_dir,
                                      min_age_s=min_age_s, dry_run=dry_run))


def _remove_blob(factory: sessionmaker[Session], path: Path, sha256: str, min_age_s: float) -> bool:
    aside = path.with_name(f".gc-{uuid.uuid4().hex}-{path.name}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    # looked at again, after the rename: a racing upload either touched it before (fresh
    # mtime), committed its row before (live), or finds no file and writes a new one
    if not _old(aside, min_age_s, time.time()) or _is_live(factory, sha256):
        if path.exists():
            aside.unlink()
        else:
            os.rename(aside, path)
        return False
    aside.unlink()
    return True


def _drop_temp(path: Path, min_age_s: float, now: float, report: GcReport, dry_run: bool) -> None:
    if _old(path, min_age_s, now):
        report.temp_files_deleted += 1
        if not dry_run:
            path.unlink(missing_ok=True)


def _prefix_key(path: Path) -> str | None:
    """The ``key`` (``<adapter sha256>:<base fingerprint>``) in a stored prefix's header."""
    try:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(min(n, 1 << 20)))
        return (header.get("__metadata__") or {}).get("key")
    except (OSError, ValueError, struct.error):
        return None  # unreadable: not a prefix we can vouch for; treated as garbage

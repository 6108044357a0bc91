"""Storage garbage collection on a real migrated database (SQLite and PostgreSQL) with real
blobs and stored prefixes: what goes, what stays, and the guards against a racing upload."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptfleet.adapters.prefix_store import PrefixStore
from promptfleet.adapters.service import cache_key, delete_adapter, import_adapter
from promptfleet.adapters.storage import LocalBlobStorage
from promptfleet.client import zip_directory
from promptfleet.db import session_scope
from promptfleet.platform.adapter import build_prefix, load_adapter_dir
from promptfleet.platform.config import ModelConfig
from promptfleet.platform.weights import load_gpt2, weights_id
from promptfleet.storage_gc import _remove_blob, collect_garbage
from promptfleet.tenants.service import create_tenant
from promptfleet.testing import make_peft_adapter

HOUR = 3600.0


def _age(path: Path, seconds: float = 2 * HOUR) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


@pytest.fixture
def stored(session_factory, tiny_checkpoint, tmp_path):
    """Three adapters of one tenant -- 'keep', 'drop', and 'twin' (the same bytes as
    'keep') -- with blobs and stored prefixes; then 'drop' and 'twin' are deleted."""
    storage = LocalBlobStorage(tmp_path / "blobs")
    cfg = ModelConfig.from_pretrained(tiny_checkpoint)
    model = load_gpt2(tiny_checkpoint)
    prefixes = PrefixStore(tmp_path / "prefixes", weights_id=weights_id(tiny_checkpoint), dtype=model.wte.weight.dtype,
                           device="cpu")
    folders = {name: make_peft_adapter(tiny_checkpoint, tmp_path / name, "prompt_tuning", 3, seed)
               for name, seed in (("keep", 1), ("drop", 2))}
    versions = {}
    with session_scope(session_factory) as session:
        tenant, _ = create_tenant(session, name="gc-tenant")
        for name, folder in (("keep", folders["keep"]), ("drop", folders["drop"]), ("twin", folders["keep"])):
            row = import_adapter(session, storage=storage, tenant_id=tenant.id, name=name, archive=zip_directory(folder),
                                 model_config=cfg)
            versions[name] = (row.sha256, cache_key(row))
            prefixes.save(build_prefix(model, load_adapter_dir(folder), cache_key(row)))
        session.flush()
        delete_adapter(session, tenant_id=tenant.id, name="drop")
        delete_adapter(session, tenant_id=tenant.id, name="twin")
    for path in (tmp_path / "blobs").rglob("*"):
        if path.is_file():
            _age(path)
    for path in (tmp_path / "prefixes").rglob("*"):
        if path.is_file():
            _age(path)
    return storage, prefixes, versions, tmp_path


def test_gc_removes_only_what_no_live_row_refers_to(session_factory, stored):
    storage, prefixes, versions, root = stored
    keep_sha, keep_key = versions["keep"]
    drop_sha, drop_key = versions["drop"]
    assert versions["twin"] == versions["keep"]  # same bytes: one blob, one stored prefix (content-addressed)
    stale_temp = root / "blobs" / "ab" / ".tmp-crashed.part"
    stale_temp.parent.mkdir(parents=True, exist_ok=True)
    stale_temp.write_bytes(b"half a blob")
    _age(stale_temp)

    dry = collect_garbage(session_factory, blob_root=root / "blobs", prefix_root=root / "prefixes",
                          min_age_s=HOUR, dry_run=True)
    assert (dry.blobs_deleted, dry.prefixes_deleted, dry.temp_files_deleted) == (1, 1, 1)
    assert storage.exists(drop_sha) and stale_temp.exists()  # a dry run deletes nothing

    report = collect_garbage(session_factory, blob_root=root / "blobs", prefix_root=root / "prefixes",
                             min_age_s=HOUR)
    assert (report.blobs_deleted, report.prefixes_deleted, report.temp_files_deleted) == (1, 1, 1)
    assert report.blob_bytes_freed > 0 and report.prefix_bytes_freed > 0
    assert not storage.exists(drop_sha) and not stale_temp.exists()
    assert storage.get(keep_sha)                 # live (and shared with the deleted twin): kept, intact
    assert prefixes.load(keep_key) is not None   # the live adapter's stored prefix stays
    assert prefixes.load(drop_key) is None       # the deleted one's is gone (a cache: rebuilt if needed)
    again = collect_garbage(session_factory, blob_root=root / "blobs", prefix_root=root / "prefixes",
                            min_age_s=HOUR)
    assert (again.blobs_deleted, again.prefixes_deleted) == (0, 0)


def test_recently_touched_garbage_waits(session_factory, stored):
    storage, _, versions, root = stored
    drop_sha = versions["drop"][0]
    storage.put(storage.get(drop_sha))  # an upload of the same bytes touches the blob
    report = collect_garbage(session_factory, blob_root=root / "blobs", prefix_root=None, min_age_s=HOUR)
    assert report.blobs_deleted == 0 and report.kept_recent == 1 and storage.exists(drop_sha)


def test_a_blob_touched_or_made_live_after_selection_is_put_back(session_factory, stored):
    """The sweep renames a candidate aside, then looks again: an upload that touched it in
    between, or committed a row for it, keeps it."""
    storage, _, versions, root = stored
    drop_sha, keep_sha = versions["drop"][0], versions["keep"][0]
    drop_path = root / "blobs" / drop_sha[:2] / drop_sha[2:]
    os.utime(drop_path)  # touched after the sweep chose it
    assert _remove_blob(session_factory, drop_path, drop_sha, HOUR) is False
    assert storage.get(drop_sha)
    keep_path = root / "blobs" / keep_sha[:2] / keep_sha[2:]  # old, but live by the time it is looked at again
    assert _remove_blob(session_factory, keep_path, keep_sha, HOUR) is False
    assert storage.get(keep_sha)
    assert not list((root / "blobs").rglob(".gc-*"))


def test_cli_gc_reports_json(tmp_path):
    env = {**os.environ, "PROMPTFLEET_DATA_DIR": str(tmp_path / "data")}
    unmigrated = subprocess.run([sys.executable, "-m", "promptfleet.cli", "gc"], env=env, capture_output=True,
                                text=True, timeout=120)
    assert unmigrated.returncode == 2 and "promptfleet db upgrade" in unmigrated.stderr + unmigrated.stdout
    subprocess.run([sys.executable, "-m", "promptfleet.cli", "db", "upgrade"], env=env, check=True,
                   capture_output=True, timeout=120)
    out = subprocess.run([sys.executable, "-m", "promptfleet.cli", "gc", "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["dry_run"] is True and report["blobs_deleted"] == 0

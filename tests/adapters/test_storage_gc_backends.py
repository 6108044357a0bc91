"""``promptfleet gc`` on both blob backends (a directory; an S3 bucket on moto_server) with
real imports on a migrated database: what goes, what stays, and on S3 the trash that
keeps a blob readable for an upload that raced the sweep."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from promptfleet.adapters.blob_url import open_blob_storage, shared_prefixes
from promptfleet.adapters.prefix_store import PrefixStore
from promptfleet.adapters.s3_storage import S3BlobStorage, blob_key, trash_key
from promptfleet.adapters.service import cache_key, delete_adapter, import_adapter
from promptfleet.adapters.storage import BlobNotFoundError
from promptfleet.db import session_scope
from promptfleet.platform.adapter import build_prefix, load_adapter_dir
from promptfleet.platform.config import ModelConfig
from promptfleet.platform.weights import load_gpt2, weights_id
from promptfleet.settings import Settings
from promptfleet.storage_gc import collect_for_settings
from promptfleet.tenants.service import create_tenant
from promptfleet.testing import make_peft_adapter

SQLITE_ONLY = pytest.mark.parametrize("empty_db_url", ["sqlite"], indirect=True)  # PostgreSQL: test_storage_gc


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f.name)
    return buf.getvalue()


@pytest.fixture
def world(session_factory, tiny_checkpoint, tmp_path, blob_url, prompt_adapter_dir):
    """Adapters 'keep' and 'drop' with blobs and stored prefixes (local disk, and the
    bucket on S3); then 'drop' is deleted."""
    settings = Settings(data_dir=tmp_path / "data", blob_url=blob_url)
    storage = open_blob_storage(blob_url, default_root=settings.blob_dir)
    model = load_gpt2(tiny_checkpoint)
    prefixes = PrefixStore(settings.prefix_dir, weights_id=weights_id(tiny_checkpoint), dtype=model.wte.weight.dtype,
                           device="cpu", shared=shared_prefixes(storage))
    cfg = ModelConfig.from_pretrained(tiny_checkpoint)
    drop_dir = make_peft_adapter(tiny_checkpoint, tmp_path / "drop", "prompt_tuning", 5, seed=3)
    archives = {"keep": _zip(prompt_adapter_dir), "drop": _zip(drop_dir)}
    shas = {}
    with session_scope(session_factory) as session:
        tenant, _ = create_tenant(session, name="gc-backends")
        for name, folder in (("keep", prompt_adapter_dir), ("drop", drop_dir)):
            row = import_adapter(session, storage=storage, tenant_id=tenant.id, name=name, archive=archives[name],
                                 model_config=cfg)
            shas[name] = (row.sha256, cache_key(row))
            prefixes.save(build_prefix(model, load_adapter_dir(folder), cache_key(row)))
        session.flush()
        delete_adapter(session, tenant_id=tenant.id, name="drop")
    return settings, storage, prefixes, shas, archives, tenant.id, cfg


@SQLITE_ONLY
def test_gc_collects_only_unreferenced_bytes_on_both_backends(session_factory, world):
    settings, storage, prefixes, shas, *_ = world
    (keep_sha, keep_key), (drop_sha, drop_key) = shas["keep"], shas["drop"]
    s3 = isinstance(storage, S3BlobStorage)

    fresh = collect_for_settings(session_factory, settings, min_age_s=3600)
    assert (fresh.blobs_deleted, fresh.prefixes_deleted) == (0, 0)
    assert fresh.kept_recent == (3 if s3 else 2)  # the blob, its local prefix (and its shared one)
    dry = collect_for_settings(session_factory, settings, min_age_s=0, dry_run=True)
    assert (dry.blobs_deleted, dry.prefixes_deleted) == (1, 2 if s3 else 1) and storage.exists(drop_sha)

    report = collect_for_settings(session_factory, settings, min_age_s=0)
    assert (report.blobs_deleted, report.prefixes_deleted) == (1, 2 if s3 else 1)
    assert report.blob_bytes_freed > 0 and not storage.exists(drop_sha)
    assert storage.get(keep_sha) and prefixes.load(keep_key) is not None
    assert prefixes.load(drop_key) is None
    if s3:  # set aside, not gone: the next run purges it
        assert storage.objects.head(trash_key(drop_sha)) is not None
        again = collect_for_settings(session_factory, settings, min_age_s=0)
        assert (again.trash_purged, again.blobs_deleted) == (1, 0)
        assert storage.objects.head(trash_key(drop_sha)) is None
    with pytest.raises(BlobNotFoundError):
        storage.get(drop_sha)
    assert storage.get(keep_sha)


@SQLITE_ONLY
@pytest.mark.parametrize("blob_url", ["s3"], indirect=True)
def test_s3_a_blob_set_aside_while_a_row_came_to_point_at_it_is_put_back(session_factory, world):
    settings, storage, _, shas, archives, tenant_id, cfg = world
    drop_sha = shas["drop"][0]
    collect_for_settings(session_factory, settings, min_age_s=0)  # 'drop' goes to the trash
    # an upload of the same bytes that found the blob just before the sweep moved it: its
    # row is committed, but blobs/ no longer has the object
    with session_scope(session_factory) as session:
        import_adapter(session, storage=storage, tenant_id=tenant_id, name="again", archive=archives["drop"],
                       model_config=cfg)
    storage.objects.delete(blob_key(drop_sha))
    report = collect_for_settings(session_factory, settings, min_age_s=0)
    assert report.trash_restored == 1 and report.trash_purged == 0 and report.blobs_deleted == 0
    assert storage.exists(drop_sha) and storage.objects.head(trash_key(drop_sha)) is None
    # and a read in between restores it too
    collect_for_settings(session_factory, settings, min_age_s=0)
    storage.objects.copy(blob_key(drop_sha), trash_key(drop_sha))
    storage.objects.delete(blob_key(drop_sha))
    assert hashlib.sha256(storage.get(drop_sha)).hexdigest() == drop_sha
    assert storage.exists(drop_sha)  # put back by the read


@pytest.mark.parametrize("blob_url", ["s3"], indirect=True)
def test_cli_gc_on_s3(blob_url, s3_endpoint, tmp_path):
    env = {**os.environ, "PROMPTFLEET_DATA_DIR": str(tmp_path / "cli-data"), "PROMPTFLEET_BLOB_URL": blob_url,
           "AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    env.pop("PROMPTFLEET_DATABASE_URL", None)
    subprocess.run([sys.executable, "-m", "promptfleet.cli", "db", "upgrade"], env=env, check=True,
                   capture_output=True, timeout=120)
    out = subprocess.run([sys.executable, "-m", "promptfleet.cli", "gc", "--min-age", "0"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["blobs_deleted"] == 0 and report["trash_purged"] == 0
    down = subprocess.run([sys.executable, "-m", "promptfleet.cli", "gc"], capture_output=True, text=True,
                          timeout=120, env={**env, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_MAX_ATTEMPTS": "1"})
    assert down.returncode == 3 and "cannot reach blob storage" in down.stderr

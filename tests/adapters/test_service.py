"""Registry service: versions, soft delete, tenant isolation, idempotency, races, integrity."""
from __future__ import annotations

import json
import dataclasses

import pytest
import torch
from safetensors.torch import load as load_safetensors
from sqlalchemy import func, select

from promptfleet.adapters import service
from promptfleet.adapters.errors import AdapterIncompatible, AdapterNotFound, AdapterRejected
from promptfleet.adapters.fingerprint import model_fingerprint
from promptfleet.adapters.models import AdapterVersion
from promptfleet.adapters.service import (cache_key, delete_adapter, export_adapter, import_adapter, list_adapters,
                                          list_versions, load_adapter_weights, register_adapter, resolve_adapter)
from promptfleet.adapters.storage import CorruptBlobError
from promptfleet.db import session_scope
from promptfleet.platform.config import ModelConfig
from promptfleet.tenants.service import TenantNotFound
from promptfleet.testing.adapter_files import prompt_tuning_files
from promptfleet.testing.archives import zip_bytes


@pytest.fixture
def upload(session_factory, storage, tiny_config):
    """upload(tenant_id, name, seed=...) -> AdapterVersion, via a zip through import_adapter."""
    def _upload(tenant_id: str, name: str, *, seed: int = 0, n: int = 4) -> AdapterVersion:
        config, weights = prompt_tuning_files(tiny_config, n=n, seed=seed)
        archive = zip_bytes({"adapter_config.json": json.dumps(config).encode(),
                                     "adapter_model.safetensors": weights})
        with session_scope(session_factory) as s:
            return import_adapter(s, storage=storage, tenant_id=tenant_id, name=name, archive=archive,
                                  model_config=tiny_config)
    return _upload


def test_model_fingerprint():
    assert model_fingerprint(ModelConfig()) == "gpt2-L12-H12-D768-V50257-P1024"
    llama = ModelConfig(family="llama", n_layer=12, n_head=12, n_kv_head=4, n_embd=768, vocab_size=50257,
                        n_positions=1024, intermediate_size=2048)
    assert model_fingerprint(llama) == "llama-L12-H12-KV4-D768-V50257-P1024"


def test_versions_and_refs(session_factory, tenant_id, upload, tiny_config):
    v1, v2, v3 = (upload(tenant_id, "sentiment", seed=i) for i in range(3))
    assert [v.version for v in (v1, v2, v3)] == [1, 2, 3]
    assert v1.peft_type == "PROMPT_TUNING" and v1.num_virtual_tokens == 4
    assert v1.shapes == {"prompt_embeddings": [4, tiny_config.n_embd]}
    assert v1.base_fingerprint == model_fingerprint(tiny_config)
    assert v1.source_job_id is None and v1.size_bytes > 0 and len(v1.sha256) == 64
    upload(tenant_id, "other")
    with session_scope(session_factory) as s:
        assert resolve_adapter(s, tenant_id=tenant_id, ref="sentiment").id == v3.id
        assert resolve_adapter(s, tenant_id=tenant_id, ref="sentiment@1").id == v1.id
        assert resolve_adapter(s, tenant_id=tenant_id, ref="sentiment@2").id == v2.id
        for ref in ("sentiment@4", "sentiment@0", "sentiment@x", "sentiment@", "missing", "a/b", "sentiment@1@2"):
            with pytest.raises(AdapterNotFound, match="not found"):
                resolve_adapter(s, tenant_id=tenant_id, ref=ref)
        assert [(a.name, a.version) for a in list_adapters(s, tenant_id=tenant_id)] == [("other", 1),
                                                                                      ("sentiment", 3)]
        assert [v.version for v in list_versions(s, tenant_id=tenant_id, name="sentiment")] == [1, 2, 3]


def test_identical_uploads_share_one_blob(session_factory, storage, tenant_id, upload):
    a, b = upload(tenant_id, "same", seed=5), upload(tenant_id, "same", seed=5)
    assert (a.version, b.version) == (1, 2) and a.sha256 == b.sha256
    assert len([p for p in storage.root.rglob("*") if p.is_file()]) == 1


def test_soft_delete(session_factory, storage, tenant_id, upload):
    v1, v2 = upload(tenant_id, "gone", seed=1), upload(tenant_id, "gone", seed=2)
    upload(tenant_id, "kept")
    with session_scope(session_factory) as s:
        assert delete_adapter(s, tenant_id=tenant_id, name="gone") == 2
    with session_scope(session_factory) as s:
        for ref in ("gone", "gone@1", "gone@2"):
            with pytest.raises(AdapterNotFound):
                resolve_adapter(s, tenant_id=tenant_id, ref=ref)
        with pytest.raises(AdapterNotFound):
            delete_adapter(s, tenant_id=tenant_id, name="gone")
        assert [a.name for a in list_adapters(s, tenant_id=tenant_id)] == ["kept"]
        assert list_versions(s, tenant_id=tenant_id, name="gone") == []
        rows = s.scalars(select(AdapterVersion).where(AdapterVersion.name == "gone")).all()
        assert len(rows) == 2 and all(r.deleted_at is not None for r in rows)  # soft: rows remain
    assert storage.exists(v1.sha256) and storage.exists(v2.sha256)
    v3 = upload(tenant_id, "gone", seed=3)
    assert v3.version == 3  # numbers are never reused


def test_delete_one_version(session_factory, tenant_id, upload):
    upload(tenant_id, "x", seed=1), upload(tenant_id, "x", seed=2)
    with session_scope(session_factory) as s:
        assert delete_adapter(s, tenant_id=tenant_id, name="x@2") == 1
    with session_scope(session_factory) as s:
        assert resolve_adapter(s, tenant_id=tenant_id, ref="x").version == 1


def test_tenant_isolation(session_factory, storage, tenant_id, other_tenant_id, upload):
    upload(tenant_id, "private")
    with session_scope(session_factory) as s:
        assert list_adapters(s, tenant_id=other_tenant_id) == []
        assert list_versions(s, tenant_id=other_tenant_id, name="private") == []
        errors = []
        for ref in ("private", "private@1"):
            with pytest.raises(AdapterNotFound) as theirs:
                resolve_adapter(s, tenant_id=other_tenant_id, ref=ref)
            errors.append(str(theirs.value))
            with pytest.raises(AdapterNotFound):
                export_adapter(s, storage=storage, tenant_id=other_tenant_id, ref=ref)
        with pytest.raises(AdapterNotFound) as missing:
            resolve_adapter(s, tenant_id=tenant_id, ref="nonexistent")
        # Another tenant's adapter looks exactly like a missing one.
        assert errors[0] == str(missing.value).replace("nonexistent", "private")
        with pytest.raises(AdapterNotFound):
            delete_adapter(s, tenant_id=other_tenant_id, name="private")
    with session_scope(session_factory) as s:
        assert resolve_adapter(s, tenant_id=tenant_id, ref="private").version == 1  # untouched
    assert upload(other_tenant_id, "private").version == 1  # same name, independent numbering


def test_unknown_tenant_refused(session_factory, storage, tiny_config):
    config, weights = prompt_tuning_files(tiny_config)
    with session_scope(session_factory) as s:
        with pytest.raises(TenantNotFound):
            register_adapter(s, storage=storage, tenant_id="0" * 32, name="x", config=config,
                             safetensors_bytes=weights, model_config=tiny_config)
    assert [p for p in storage.root.rglob("*") if p.is_file()] == []


def test_register_is_idempotent_on_job_id(session_factory, storage, tenant_id, other_tenant_id, tiny_config):
    config, weights = prompt_tuning_files(tiny_config, seed=3)
    with session_scope(session_factory) as s:
        first = register_adapter(s, storage=storage, tenant_id=tenant_id, name="trained", config=config,
                                 safetensors_bytes=weights, model_config=tiny_config, source_job_id="job-1")
    with session_scope(session_factory) as s:
        again = register_adapter(s, storage=storage, tenant_id=tenant_id, name="trained", config=config,
                                 safetensors_bytes=weights, model_config=tiny_config, source_job_id="job-1")
        assert again.id == first.id and again.version == 1 and again.source_job_id == "job-1"
        with pytest.raises(AdapterRejected, match="another tenant"):
            register_adapter(s, storage=storage, tenant_id=other_tenant_id, name="trained", config=config,
                             safetensors_bytes=weights, model_config=tiny_config, source_job_id="job-1")
        assert s.scalar(select(func.count()).select_from(AdapterVersion)) == 1
        with pytest.raises(AdapterRejected, match="width 96"):
            register_adapter(s, storage=storage, tenant_id=tenant_id, name="trained",
                             config={**config, "token_dim": None}, safetensors_bytes=prompt_tuning_files(
                                 tiny_config, width=96)[1], model_config=tiny_config, source_job_id="job-2")


def test_version_race_is_retried(session_factory, storage, tenant_id, upload, monkeypatch):
    """A concurrent upload took the version number we computed: the unique constraint
    fires in the real database and the insert is retried with the next number."""
    upload(tenant_id, "racy", seed=1)
    real = service._next_version
    calls = []

    def stale_once(session, **kw):
        calls.append(kw)
        return real(session, **kw) - (1 if len(calls) == 1 else 0)

    monkeypatch.setattr(service, "_next_version", stale_once)
    v2 = upload(tenant_id, "racy", seed=2)
    assert v2.version == 2 and len(calls) == 2
    with session_scope(session_factory) as s:
        assert [v.version for v in list_versions(s, tenant_id=tenant_id, name="racy")] == [1, 2]


def test_failed_insert_removes_only_its_own_blob(session_factory, storage, tenant_id, upload, monkeypatch):
    upload(tenant_id, "racy", seed=1)
    monkeypatch.setattr(service, "_next_version", lambda session, **kw: 1)  # always taken
    with pytest.raises(service.AdapterConflict, match="concurrent uploads"):
        upload(tenant_id, "racy", seed=2)
    with pytest.raises(service.AdapterConflict):  # identical content: the blob is v1's, so it stays
        upload(tenant_id, "racy", seed=1)
    assert len([p for p in storage.root.rglob("*") if p.is_file()]) == 1


def test_fingerprint_mismatch_refused_at_resolve(session_factory, tenant_id, upload, tiny_config):
    upload(tenant_id, "a")
    bigger = dataclasses.replace(tiny_config, n_positions=2048)
    with session_scope(session_factory) as s:
        assert resolve_adapter(s, tenant_id=tenant_id, ref="a", model_config=tiny_config).version == 1
        with pytest.raises(AdapterIncompatible, match="made for base model gpt2-L2-H4-D64-V50257-P1024.*P2048"):
            resolve_adapter(s, tenant_id=tenant_id, ref="a", model_config=bigger)


def test_load_weights_and_corrupt_blob(session_factory, storage, tenant_id, upload, tiny_config):
    version = upload(tenant_id, "w", seed=9)
    weights = load_adapter_weights(storage=storage, version=version)
    _, raw = prompt_tuning_files(tiny_config, seed=9)
    assert torch.equal(weights.prompt_embeddings, load_safetensors(raw)["prompt_embeddings"])
    assert cache_key(version) == f"{version.sha256}:{version.base_fingerprint}"
    path = storage.root / version.sha256[:2] / version.sha256[2:]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlobError, match="corrupt"):
        load_adapter_weights(storage=storage, version=version)
    with session_scope(session_factory) as s:
        with pytest.raises(CorruptBlobError):
            export_adapter(s, storage=storage, tenant_id=tenant_id, ref="w")


def test_concurrent_uploads_of_one_name_get_distinct_versions(session_factory, tenant_id, upload):
    import threading

    barrier = threading.Barrier(4)
    results, errors = [], []

    def worker(seed: int) -> None:
        barrier.wait()
        try:
            results.append(upload(tenant_id, "busy", seed=seed).version)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [1, 2, 3, 4]

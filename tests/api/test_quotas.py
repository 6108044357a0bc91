"""Per-tenant storage quota over HTTP, on SQLite and PostgreSQL: uploads past it are
refused with 403 and store nothing, deleting adapters frees it, datasets count too,
one tenant's usage never limits another's, and concurrent uploads cannot overshoot it."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from promptfleet.adapters.models import AdapterVersion
from promptfleet.adapters.storage import LocalBlobStorage
from promptfleet.api.quotas import stored_bytes


def test_storage_quota_refuses_past_it_and_deleting_frees_it(make_api, db_kind, peft_zips):
    archive = peft_zips["pt"]
    # an upload counts at its uploaded size, a stored version at its stored size: measure
    # the latter, then allow exactly two uploads (the third finds 2 stored + 1 uploaded)
    probe = make_api(db=db_kind, tenant_max_storage_mb=0)
    stored = probe.upload(probe.new_tenant("probe")[1], "x", archive).json()["size_bytes"]
    quota_mb = (len(archive) + 1.5 * stored) / (1 << 20)
    api = make_api(db=db_kind, tenant_max_storage_mb=quota_mb)
    alice_id, alice = api.new_tenant("alice")
    _, bob = api.new_tenant("bob")

    assert api.upload(alice, "one", archive).status_code == 201
    assert api.upload(alice, "two", archive).status_code == 201
    blobs_before = sorted(p for p in Path(api.settings.blob_dir).rglob("*") if p.is_file())
    r = api.upload(alice, "three", archive)
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "storage_quota_exceeded" and "tenant_max_storage_mb" in err["message"]
    # nothing of the refused upload was stored
    assert api.client.get("/v1/adapters/three", headers=alice).status_code == 404
    assert sorted(p for p in Path(api.settings.blob_dir).rglob("*") if p.is_file()) == blobs_before

    # another tenant has its own quota
    assert api.upload(bob, "three", archive).status_code == 201
    # datasets count against the same quota
    r = api.client.post("/v1/datasets", files={"file": ("d.jsonl", b'{"prompt": "a", "completion": "b"}\n' * 5000,
                                                         "application/jsonl")}, headers=alice)
    assert r.status_code == 403 and r.json()["error"]["code"] == "storage_quota_exceeded", r.text

    # deleting a version frees its bytes
    assert api.client.delete("/v1/adapters/one", headers=alice).status_code in (200, 204)
    assert api.upload(alice, "three", archive).status_code == 201


def test_stored_bytes_counts_live_versions_and_zero_means_no_limit(make_api, peft_zips):
    api = make_api(tenant_max_storage_mb=0)
    tenant_id, alice = api.new_tenant("alice")
    for name in ("a", "b", "c"):
        assert api.upload(alice, name, peft_zips["pt"]).status_code == 201
    api.client.delete("/v1/adapters/b", headers=alice)
    with api.state.session_factory() as session:
        rows = session.query(AdapterVersion).filter_by(tenant_id=tenant_id, deleted_at=None).all()
        assert stored_bytes(session, tenant_id=tenant_id) == sum(r.size_bytes for r in rows) > 0
        assert len(rows) == 2


def test_concurrent_uploads_at_the_edge_cannot_both_pass(make_api, db_kind, peft_zips):
    """Four uploads of one tenant at once with room for one: exactly one is stored. The
    storage is held open 0.3 s per put so that, without the tenant lock, every request
    would pass its check before any of them had stored anything."""
    archive = peft_zips["pt"]
    probe = make_api(db=db_kind, tenant_max_storage_mb=0)
    stored = probe.upload(probe.new_tenant("probe")[1], "x", archive).json()["size_bytes"]
    api = make_api(db=db_kind, tenant_max_storage_mb=(len(archive) + stored / 2) / (1 << 20))
    tenant_id, alice = api.new_tenant("alice")

    class SlowStorage(LocalBlobStorage):
        def put(self, data: bytes) -> str:
            time.sleep(0.3)
            return super().put(data)

    api.state.storage = SlowStorage(api.settings.blob_dir)
    codes: list[int] = []

    def upload(i: int) -> None:
        codes.append(api.upload(alice, f"race{i}", archive).status_code)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201, 403, 403, 403], codes
    with api.state.session_factory() as session:
        assert session.query(AdapterVersion).filter_by(tenant_id=tenant_id, deleted_at=None).count() == 1

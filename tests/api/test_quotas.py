"""Per-tenant storage quota over HTTP, on SQLite and PostgreSQL: uploads past it are
refused with 403 and store nothing, deleting adapters frees it, datasets count too, and
one tenant's usage never limits another's."""
from __future__ import annotations

from pathlib import Path

from promptfleet.adapters.models import AdapterVersion
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

"""Authentication, the admin API and request ids, on SQLite and PostgreSQL."""
from __future__ import annotations

import pytest

from promptfleet.testing import api_error as _err


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer pf-not-a-real-key"},
                                     {"Authorization": "Bearer " + "x" * 300}])
@pytest.mark.parametrize("path", ["/v1/models", "/v1/adapters", "/v1/jobs/abc", "/v1/datasets"])
def test_v1_needs_a_valid_tenant_key(api, headers, path):
    err = _err(api.client.get(path, headers=headers), 401, "invalid_api_key")
    assert err["type"] == "authentication_error"


def test_completions_needs_a_key(api):
    r = api.client.post("/v1/completions", json={"model": "gpt2", "prompt": "hi"})
    _err(r, 401)
    assert r.headers["www-authenticate"] == "Bearer"


def test_admin_needs_the_admin_key(api):
    _, tenant_headers = api.new_tenant()
    for headers in ({}, tenant_headers, {"Authorization": "Bearer wrong"}):
        _err(api.client.get("/admin/tenants", headers=headers), 401)
        _err(api.client.post("/admin/tenants", json={"name": "x"}, headers=headers), 401)
    # and the admin key is no tenant key
    _err(api.client.get("/v1/models", headers=api.admin()), 401)


def test_admin_key_disabled_when_empty(make_api):
    api = make_api(admin_key="")
    _err(api.client.get("/admin/tenants", headers={"Authorization": "Bearer "}), 401)
    _err(api.client.get("/admin/tenants", headers={"Authorization": "Bearer x"}), 401)


def test_tenant_lifecycle(make_api, db_kind):
    api = make_api(db=db_kind)
    r = api.client.post("/admin/tenants", json={"name": f"acme-{db_kind}", "max_concurrent": 3, "rate_per_s": 5.0},
                        headers=api.admin())
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["name"] == f"acme-{db_kind}" and created["api_key"].startswith("pf-")
    assert created["max_concurrent"] == 3 and created["rate_per_s"] == 5.0
    key = created["api_key"]
    assert api.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    listed = api.client.get("/admin/tenants", headers=api.admin()).json()
    row = next(t for t in listed["data"] if t["id"] == created["id"])
    assert "api_key" not in row and row["name"] == created["name"]
    assert key not in api.client.get("/admin/tenants", headers=api.admin()).text

    _err(api.client.post("/admin/tenants", json={"name": f"acme-{db_kind}"}, headers=api.admin()), 409,
         "tenant_exists")
    _err(api.client.post("/admin/tenants", json={"name": "Bad Name!"}, headers=api.admin()), 400,
         "invalid_tenant_name")
    _err(api.client.post("/admin/tenants", json={}, headers=api.admin()), 400)

    r = api.client.post(f"/admin/tenants/{created['id']}/rotate-key", headers=api.admin())
    assert r.status_code == 200, r.text
    new_key = r.json()["api_key"]
    assert new_key != key and r.json()["id"] == created["id"]
    _err(api.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}), 401)
    assert api.client.get("/v1/models", headers={"Authorization": f"Bearer {new_key}"}).status_code == 200
    _err(api.client.post("/admin/tenants/0123456789abcdef0123456789abcdef/rotate-key", headers=api.admin()), 404)
    _err(api.client.post("/admin/tenants/bad%00id/rotate-key", headers=api.admin()), 404)


def test_tenant_limits_change_from_the_next_request(make_api, db_kind):
    """PATCH /admin/tenants/{id}: the limits given change (null: the server's default), the
    others stay; a rate of 1 per 100 s with burst 1 refuses the second request at once, and
    back to the default it does not."""
    api = make_api(db=db_kind)
    tenant_id, h = api.new_tenant("limits")
    url = f"/admin/tenants/{tenant_id}"
    r = api.client.patch(url, json={"max_concurrent": 2, "rate_per_s": 0.01, "rate_burst": 1}, headers=api.admin())
    assert r.status_code == 200, r.text
    assert (r.json()["max_concurrent"], r.json()["rate_per_s"], r.json()["rate_burst"]) == (2, 0.01, 1)
    assert api.client.get("/v1/models", headers=h).status_code == 200
    _err(api.client.get("/v1/models", headers=h), 429)
    r = api.client.patch(url, json={"rate_per_s": None}, headers=api.admin())  # the others stay
    assert (r.json()["max_concurrent"], r.json()["rate_per_s"], r.json()["rate_burst"]) == (2, None, 1)
    listed = next(t for t in api.client.get("/admin/tenants", headers=api.admin()).json()["data"]
                  if t["id"] == tenant_id)
    assert (listed["max_concurrent"], listed["rate_per_s"], listed["rate_burst"]) == (2, None, 1)
    for body in ({"rate_per_s": 0}, {"max_concurrent": "3"}, {"max_concurrent": 0}, {"name": "x"}):
        assert api.client.patch(url, json=body, headers=api.admin()).status_code in (400, 422), body
    _err(api.client.patch("/admin/tenants/0123456789abcdef0123456789abcdef", json={"rate_burst": 2},
                          headers=api.admin()), 404, "tenant_not_found")
    _err(api.client.patch(url, json={"rate_burst": 2}, headers=h), 401)
    after = next(t for t in api.client.get("/admin/tenants", headers=api.admin()).json()["data"]
                 if t["id"] == tenant_id)
    assert (after["max_concurrent"], after["rate_per_s"], after["rate_burst"]) == (2, None, 1)  # refusals changed nothing


def test_request_id_is_echoed_or_made(api):
    r = api.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    made = api.client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32
    # a hostile id is replaced, not echoed
    r = api.client.get("/healthz", headers={"X-Request-ID": "a b<script>" + "x" * 200})
    assert r.headers["x-request-id"] != "a b<script>" and len(r.headers["x-request-id"]) == 32
    # errors carry it too
    assert api.client.get("/v1/models", headers={"X-Request-ID": "rid-9"}).headers["x-request-id"] == "rid-9"


def test_unknown_route_and_method_have_openai_error_shape(api):
    _err(api.client.get("/v1/nothing-here"), 404, "not_found")
    _err(api.client.delete("/v1/completions"), 405, "method_not_allowed")
    r = api.client.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json",
                                                                            **api.new_tenant()[1]})
    _err(r, 400, "invalid_parameters")

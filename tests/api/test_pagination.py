"""OpenAI-style pagination of the list endpoints: ``limit`` (1-100, default 20) and
``after`` (the last item's id), answers with ``has_more``/``first_id``/``last_id``; a stable
order; 400 for a bad limit or a cursor that is not an item of the caller's list (another
tenant's included); the CLI's client pages through everything; ``models.list()`` of the
official openai client still sees every model."""
from __future__ import annotations

import json

import httpx

from promptfleet.client import PromptFleetClient
from promptfleet.testing import api_error as _err
from promptfleet.testing.live_server import live_server


def jsonl(seed: int) -> bytes:
    return "".join(json.dumps({"prompt": f"item {seed} {i}:", "completion": " ok"}) + "\n"
                   for i in range(3)).encode()


def walk(api, path: str, headers: dict[str, str], limit: int, **params) -> list[dict]:
    """Every page of ``path`` at ``limit``; checks each page's envelope on the way."""
    pages, after = [], None
    for _ in range(60):  # a cursor that does not advance fails instead of looping
        query = {**params, "limit": limit, **({"after": after} if after else {})}
        r = api.client.get(path, headers=headers, params=query)
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["object"] == "list" and len(page["data"]) <= limit
        ids = [item["id"] for item in page["data"]]
        assert page["first_id"] == (ids[0] if ids else None) and page["last_id"] == (ids[-1] if ids else None)
        pages.append(page)
        if not page["has_more"]:
            return pages
        assert len(ids) == limit
        after = page["last_id"]
    raise AssertionError(f"{path} pages never ended")


def ids_of(pages: list[dict]) -> list[str]:
    return [item["id"] for page in pages for item in page["data"]]


def test_adapters_and_models_pages(make_api, db_kind, peft_zips):
    api = make_api(db=db_kind)
    _, alice = api.new_tenant("alice")
    names = [f"ad-{i}" for i in (4, 0, 6, 2, 5, 1, 3)]
    for name in names:
        assert api.upload(alice, name, peft_zips["pt"]).status_code == 201
    assert api.upload(alice, "ad-2", peft_zips["pt_v2"]).status_code == 201  # a second version of one name
    pages = walk(api, "/v1/adapters", alice, 3)
    assert [len(p["data"]) for p in pages] == [3, 3, 1] and [p["has_more"] for p in pages] == [True, True, False]
    assert [a["name"] for p in pages for a in p["data"]] == sorted(names)
    assert ids_of(pages)[2] == "ad-2@2"  # the latest version is the item and its id the cursor
    everything = api.client.get("/v1/adapters", headers=alice).json()
    assert ids_of([everything]) == ids_of(pages) and everything["has_more"] is False
    # the cursor survives its adapter being deleted between two pages
    assert api.client.delete("/v1/adapters/ad-2", headers=alice).status_code == 204
    rest = api.client.get("/v1/adapters", headers=alice, params={"after": "ad-2@2", "limit": 10}).json()
    assert [a["name"] for a in rest["data"]] == ["ad-3", "ad-4", "ad-5", "ad-6"]

    # /v1/models: every model when no limit is given (as OpenAI's), pages when asked
    models = api.client.get("/v1/models", headers=alice).json()
    want = ["gpt2", "ad-0", "ad-1", "ad-3", "ad-4", "ad-5", "ad-6"]
    assert [m["id"] for m in models["data"]] == want and models["has_more"] is False
    assert ids_of(walk(api, "/v1/models", alice, 2)) == want
    assert ids_of(walk(api, "/v1/models", alice, 1)) == want


def test_datasets_and_jobs_pages_newest_first(make_api, db_kind):
    api = make_api(db=db_kind, tenant_max_running_jobs=20)
    _, h = api.new_tenant("data")
    made = []
    for i in range(5):
        r = api.client.post("/v1/datasets", files={"file": ("t.jsonl", jsonl(i), "application/jsonl")}, headers=h)
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
    pages = walk(api, "/v1/datasets", h, 2)
    assert [p["has_more"] for p in pages] == [True, True, False]
    assert ids_of(pages) == made[::-1]

    jobs = []
    for i in range(5):
        r = api.client.post("/v1/jobs", json={"adapter_name": f"j{i}", "dataset_id": made[0], "max_steps": 1},
                            headers=h)
        assert r.status_code == 202, r.text
        jobs.append(r.json()["id"])
    assert ids_of(walk(api, "/v1/jobs", h, 2)) == jobs[::-1]
    assert ids_of(walk(api, "/v1/jobs", h, 3, status="queued")) == jobs[::-1]
    assert api.client.post(f"/v1/jobs/{jobs[2]}/cancel", headers=h).status_code == 202
    # a cursor whose job left the filtered status still marks the place
    after = api.client.get("/v1/jobs", headers=h, params={"status": "queued", "after": jobs[2]}).json()
    assert ids_of([after]) == jobs[:2][::-1]


def test_tenants_default_limit_and_bounds(make_api, db_kind):
    api = make_api(db=db_kind)  # PostgreSQL: one database per session, earlier tests' tenants come first
    made = [api.new_tenant(f"p{i:02d}")[0] for i in range(22)]
    first = api.client.get("/admin/tenants", headers=api.admin()).json()
    assert len(first["data"]) == 20 and first["has_more"] is True
    walked = ids_of(walk(api, "/admin/tenants", api.admin(), 7))
    assert walked[-22:] == made and len(set(walked)) == len(walked)
    everyone = api.client.get("/admin/tenants", headers=api.admin(), params={"limit": 100}).json()
    assert ids_of([everyone]) == walked[:100] and everyone["has_more"] is (len(walked) > 100)
    for bad in (0, -1, 101, 10**12):
        err = _err(api.client.get("/admin/tenants", headers=api.admin(), params={"limit": bad}), 400, "invalid_limit")
        assert err["param"] == "limit" and "between 1 and 100" in err["message"]
    _err(api.client.get("/admin/tenants", headers=api.admin(), params={"limit": "many"}), 400)
    _err(api.client.get("/admin/tenants", headers=api.admin(), params={"after": "no-such-tenant"}), 400,
         "invalid_cursor")


def test_bad_limits_on_every_list(api):
    _, h = api.new_tenant()
    for path in ("/v1/adapters", "/v1/datasets", "/v1/jobs", "/v1/models"):
        for bad in (0, 101):
            _err(api.client.get(path, headers=h, params={"limit": bad}), 400, "invalid_limit")


def test_another_tenants_cursor_tells_nothing(make_api, db_kind, peft_zips):
    api = make_api(db=db_kind)
    _, alice = api.new_tenant("alice")
    _, bob = api.new_tenant("bob")
    assert api.upload(bob, "secret", peft_zips["pt"]).status_code == 201
    ds = api.client.post("/v1/datasets", files={"file": ("t.jsonl", jsonl(0), "application/jsonl")}, headers=bob)
    job = api.client.post("/v1/jobs", json={"adapter_name": "x", "dataset_id": ds.json()["id"]}, headers=bob)
    cursors = {"/v1/adapters": ["secret@1", "secret"], "/v1/models": ["secret"], "/v1/datasets": [ds.json()["id"]],
               "/v1/jobs": [job.json()["id"]]}
    messages = set()
    for path, afters in cursors.items():
        for after in [*afters, "does-not-exist", "nul\x00byte", "x" * 150, "'; drop table tenants; --"]:
            err = _err(api.client.get(path, headers=alice, params={"after": after}), 400, "invalid_cursor")
            assert after not in err["message"] and "secret" not in err["message"]
            messages.add(err["message"])
    assert len(messages) == 1  # the same words whether the cursor is bob's or nobody's
    assert api.client.get("/v1/adapters", headers=bob, params={"after": "secret@1"}).json()["data"] == []


def test_client_and_openai_client_see_every_item(make_api, peft_zips):
    import openai

    api = make_api()
    _, h = api.new_tenant("many")
    names = [f"m{i:03d}" for i in range(25)]
    for name in names:
        assert api.upload(h, name, peft_zips["prefix"]).status_code == 201
    key = h["Authorization"].removeprefix("Bearer ")
    with live_server(api.app) as live:
        client = PromptFleetClient(live.base_url, key)
        assert [a["name"] for a in client.list_all("/v1/adapters", page_size=4)] == names
        assert [a["name"] for a in client.list_adapters()] == names
        assert len(PromptFleetClient(live.base_url, api.settings.admin_key).list_tenants()) == 1
        more = [api.new_tenant(f"c{i}")[0] for i in range(3)]
        assert [t["id"] for t in PromptFleetClient(live.base_url, api.settings.admin_key).list_all(
            "/admin/tenants", page_size=2)][-3:] == more
        with httpx.Client(base_url=live.base_url, headers=h) as http:
            assert len(http.get("/v1/adapters").json()["data"]) == 20  # the default page
        oai = openai.OpenAI(base_url=f"{live.base_url}/v1", api_key=key, max_retries=0)
        assert [m.id for m in oai.models.list()] == ["gpt2", *names]

"""Observability for routing: ``GET /admin/cache/adapters`` lists what THIS replica holds
warm (adapter sha256 -> the live versions that share it), ``promptfleet_adapter_warm`` on
``/metrics`` carries the same set, and every metric sample carries the ``replica`` label
(settings ``replica_id``). The expected sha256s come from the upload answers, the expected
set from which adapters the test served."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

GREEDY = {"max_tokens": 2, "temperature": 0}


def warm_metric(api) -> dict[str, float]:
    r = api.client.get("/metrics")
    assert r.status_code == 200
    out, replicas = {}, set()
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            replicas.add(s.labels.get("replica"))
            if s.name == "promptfleet_adapter_warm":
                out[s.labels["adapter_sha256"]] = s.value
    assert replicas == {"replica-x"}, replicas  # every sample, engine gauges and request counters alike
    return out


def test_warm_adapters_listed_by_endpoint_and_metric_with_the_replica_label(make_api, peft_zips):
    api = make_api(replica_id="replica-x")
    tenant_a, a = api.new_tenant("warm-a")
    tenant_b, b = api.new_tenant("warm-b")
    up = {}
    for headers, name, kind in ((a, "hot", "pt"), (a, "cold", "prefix"), (b, "twin", "pt")):
        r = api.upload(headers, name, peft_zips[kind])
        assert r.status_code == 201, r.text
        up[name] = r.json()
    assert up["hot"]["sha256"] == up["twin"]["sha256"] != up["cold"]["sha256"]  # the same PEFT files

    def listing():
        r = api.client.get("/admin/cache/adapters", headers=api.admin())
        assert r.status_code == 200, r.text
        return r.json()

    before = listing()
    assert before["replica"] == "replica-x" and before["data"] == [] and before["entries"] == 0
    assert warm_metric(api) == {}

    r = api.client.post("/v1/completions", json={"model": "hot", "prompt": "Hello", **GREEDY}, headers=a)
    assert r.status_code == 200, r.text
    after = listing()
    assert [e["sha256"] for e in after["data"]] == [up["hot"]["sha256"]]
    entry = after["data"][0]
    assert entry["bytes"] > 0 and after["bytes_used"] == entry["bytes"] and after["entries"] == 1
    # both tenants' versions share the warm prefix (same weights, content-addressed)
    assert sorted((v["tenant_id"], v["name"], v["version"]) for v in entry["versions"]) == sorted(
        [(tenant_a, "hot", 1), (tenant_b, "twin", 1)])
    assert warm_metric(api) == {up["hot"]["sha256"]: entry["bytes"]}

    # the admin key only; a tenant key is refused
    assert api.client.get("/admin/cache/adapters", headers=a).status_code == 401
    assert api.client.get("/admin/cache/adapters").status_code == 401

    # a deleted version leaves the list; the prefix stays cached until evicted
    assert api.client.delete("/v1/adapters/hot", headers=a).status_code == 204
    entry = listing()["data"][0]
    assert [(v["tenant_id"], v["name"]) for v in entry["versions"]] == [(tenant_b, "twin")]

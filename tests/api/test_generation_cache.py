"""The generation cache: deterministic requests are answered from it (plain and streamed),
never across tenants or adapter versions, and never for unseeded sampling."""
from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

GREEDY = {"model": "gpt2", "prompt": "Cache me", "max_tokens": 12, "temperature": 0}


def metric(api, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(api.client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def complete(api, headers, **overrides):
    r = api.client.post("/v1/completions", json={**GREEDY, **overrides}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def generated(api) -> int:
    return api.engine.stats().tokens_generated


def test_identical_greedy_request_is_a_hit_for_the_same_tenant_only(api):
    _, alice = api.new_tenant("alice")
    _, bob = api.new_tenant("bob")
    names = {t["id"]: t["name"] for t in api.client.get("/admin/tenants", headers=api.admin()).json()["data"]}
    alice_name = next(n for n in names.values() if n.startswith("alice"))
    bob_name = next(n for n in names.values() if n.startswith("bob"))

    before = generated(api)
    first = complete(api, alice)
    assert generated(api) > before
    assert metric(api, "promptfleet_generation_cache_hits_total", tenant=alice_name) == 0
    assert metric(api, "promptfleet_generation_cache_misses_total", tenant=alice_name) == 1

    before = generated(api)
    second = complete(api, alice)
    assert generated(api) == before  # the engine did no work
    assert second["choices"] == first["choices"] and second["usage"] == first["usage"]
    assert second["id"] != first["id"]
    assert metric(api, "promptfleet_generation_cache_hits_total", tenant=alice_name, model="gpt2") == 1

    # the same request from another tenant is generated again
    before = generated(api)
    third = complete(api, bob)
    assert generated(api) > before and third["choices"] == first["choices"]
    assert metric(api, "promptfleet_generation_cache_hits_total", tenant=bob_name) == 0

    # any parameter difference is another entry; seeded sampling is cached too
    before = generated(api)
    complete(api, alice, max_tokens=11)
    assert generated(api) > before
    a = complete(api, alice, temperature=0.8, seed=7)
    before = generated(api)
    assert complete(api, alice, temperature=0.8, seed=7)["choices"] == a["choices"]
    assert generated(api) == before
    # unseeded sampling never is
    complete(api, alice, temperature=0.8)
    before = generated(api)
    complete(api, alice, temperature=0.8)
    assert generated(api) > before


def test_streamed_request_is_served_from_the_cache_as_one_chunk(api):
    _, h = api.new_tenant()
    text = complete(api, h)["choices"][0]["text"]
    before = generated(api)
    r = api.client.post("/v1/completions", json={**GREEDY, "stream": True}, headers=h)
    assert generated(api) == before
    events = [b[len("data: "):] for b in r.text.split("\n\n") if b]
    assert events[-1] == "[DONE]" and len(events) == 2
    chunk = json.loads(events[0])
    assert chunk["choices"][0]["text"] == text and chunk["choices"][0]["finish_reason"] == "length"


def test_never_shared_across_adapter_versions(api, peft_zips):
    _, h = api.new_tenant()
    assert api.upload(h, "bot", peft_zips["pt"]).status_code == 201
    v1 = complete(api, h, model="bot")["choices"][0]["text"]
    assert complete(api, h, model="bot")["choices"][0]["text"] == v1  # a hit
    assert api.upload(h, "bot", peft_zips["pt_v2"]).json()["version"] == 2
    before = generated(api)
    v2 = complete(api, h, model="bot")["choices"][0]["text"]
    assert generated(api) > before, "version 2 was answered from version 1's cache entry"
    assert v2 != v1
    before = generated(api)
    assert complete(api, h, model="bot@1")["choices"][0]["text"] == v1
    assert complete(api, h, model="bot@2")["choices"][0]["text"] == v2
    assert generated(api) == before  # both versions are cached, each under its own key


def test_cache_can_be_disabled(make_api):
    api = make_api(generation_cache_enabled=False)
    _, h = api.new_tenant()
    complete(api, h)
    before = generated(api)
    complete(api, h)
    assert generated(api) > before


def test_lru_bounds_and_what_is_cacheable():
    from promptfleet.api.gen_cache import CachedCompletion, GenerationCache
    from promptfleet.platform.sampling import SamplingParams

    cache = GenerationCache(2)
    greedy = SamplingParams(temperature=0)
    keys = [cache.key(tenant_id="t", model_scope="base", prompt_ids=[i], params=greedy) for i in range(3)]
    value = CachedCompletion("x", "length", 1, 1)
    cache.put(keys[0], value)
    cache.put(keys[1], value)
    assert cache.get(keys[0]) == value  # now most recent
    cache.put(keys[2], value)
    assert cache.get(keys[1]) is None and cache.get(keys[0]) == value and len(cache) == 2
    assert cache.key(tenant_id="t", model_scope="base", prompt_ids=[1], params=SamplingParams()) is None
    assert cache.key(tenant_id="t", model_scope="base", prompt_ids=[1], params=SamplingParams(seed=3)) is not None
    assert keys[0] != cache.key(tenant_id="u", model_scope="base", prompt_ids=[0], params=greedy)
    assert keys[0] != cache.key(tenant_id="t", model_scope="v2:abc", prompt_ids=[0], params=greedy)
    cache.put(cache.key(tenant_id="t", model_scope="base", prompt_ids=[9], params=greedy),
              CachedCompletion("", "error", 1, 0))
    assert cache.get(cache.key(tenant_id="t", model_scope="base", prompt_ids=[9], params=greedy)) is None
    off = GenerationCache(10, enabled=False)
    assert off.key(tenant_id="t", model_scope="base", prompt_ids=[1], params=greedy) is None

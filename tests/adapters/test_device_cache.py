"""The device cache of KV prefixes: LRU under a byte budget, counters, one load per key."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from promptfleet.adapters.device_cache import AdapterCache, CacheStats
from promptfleet.platform.adapter import AdapterPrefix, AdapterWeights, build_prefix
from promptfleet.platform.weights import load_gpt2


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    return load_gpt2(tiny_checkpoint)


def _weights(seed: int, n: int = 4, dim: int = 64) -> AdapterWeights:
    return AdapterWeights("PROMPT_TUNING", n, torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)))


def test_lru_eviction_under_budget(tiny_model):
    cache_size = build_prefix(tiny_model, _weights(0), "probe").nbytes  # 2 layers * 4 heads * 4 * 16 * 4B * 2
    cache = AdapterCache(lambda w, key: build_prefix(tiny_model, w, key), budget_bytes=3 * cache_size)
    loads = []

    def get(key: str, seed: int):
        return cache.get_or_load(key, lambda: loads.append(key) or _weights(seed))

    a = get("a", 1)
    get("b", 2), get("c", 3)
    assert cache.stats() == CacheStats(hits=0, misses=3, evictions=0, entries=3, bytes_used=3 * cache_size,
                                       budget_bytes=3 * cache_size)
    assert get("a", 1) is a  # hit: "a" becomes most recent, "b" is now the oldest
    get("d", 4)
    assert "b" not in cache and all(k in cache for k in "acd")
    assert (cache.hits, cache.misses, cache.evictions, len(cache)) == (1, 4, 1, 3)
    get("b", 2)  # loads again and evicts "c"
    assert "c" not in cache and loads == ["a", "b", "c", "d", "b"]
    assert cache.bytes_used == 3 * cache_size <= cache.budget_bytes
    # The cached prefix is what build_prefix computes.
    expected = build_prefix(tiny_model, _weights(1), "a")
    assert torch.equal(a.k, expected.k) and torch.equal(a.v, expected.v)
    assert cache.invalidate("a") and "a" not in cache and cache.bytes_used == 2 * cache_size


def test_entry_larger_than_budget_is_returned_not_cached():
    def build(w: AdapterWeights, key: str) -> AdapterPrefix:
        t = torch.zeros(1, 1, w.num_virtual_tokens, 8)
        return AdapterPrefix(key=key, peft_type=w.peft_type, k=t, v=t.clone())

    cache = AdapterCache(build, budget_bytes=1000)
    small = cache.get_or_load("small", lambda: _weights(0, n=2))  # 128 bytes
    big = cache.get_or_load("big", lambda: _weights(0, n=100))  # 6400 bytes
    assert big.num_virtual_tokens == 100 and "big" not in cache and "small" in cache
    assert cache.bytes_used == small.nbytes and cache.evictions == 0


def test_concurrent_misses_load_once():
    builds = []

    def slow_build(w: AdapterWeights, key: str) -> AdapterPrefix:
        builds.append(key)
        time.sleep(0.2)
        t = torch.ones(1, 1, w.num_virtual_tokens, 4)
        return AdapterPrefix(key=key, peft_type=w.peft_type, k=t, v=t)

    cache = AdapterCache(slow_build, budget_bytes=1 << 20)
    loads = []
    results = []
    barrier = threading.Barrier(8)

    def worker(key: str) -> None:
        barrier.wait()
        results.append((key, cache.get_or_load(key, lambda: loads.append(key) or _weights(0))))

    threads = [threading.Thread(target=worker, args=("same" if i < 6 else f"other{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads.count("same") == 1 and builds.count("same") == 1
    same = [p for k, p in results if k == "same"]
    assert len(same) == 6 and all(p is same[0] for p in same)
    assert sorted(loads) == ["other6", "other7", "same"]  # other keys loaded in parallel, once each
    stats = cache.stats()
    assert (stats.misses, stats.hits, stats.entries) == (3, 5, 3)
    assert cache._loading == {}  # no per-key locks left behind


def test_failed_load_is_not_cached_and_can_be_retried():
    cache = AdapterCache(lambda w, key: AdapterPrefix(key, w.peft_type, torch.zeros(1), torch.zeros(1)), 1 << 10)

    def boom() -> AdapterWeights:
        raise OSError("blob store unavailable")

    with pytest.raises(OSError, match="unavailable"):
        cache.get_or_load("k", boom)
    assert "k" not in cache and cache._loading == {}
    assert cache.get_or_load("k", lambda: _weights(0)).peft_type == "PROMPT_TUNING"

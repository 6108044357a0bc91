"""The KV cache's memory on /metrics: what it allocated and its budget, as the scrape
collector reports them, against the cache's own tensors."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from promptfleet.api.metrics import _EngineCollector
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine


def test_metrics_report_the_kv_bytes_allocated_within_the_budget(small_checkpoint):
    budget = (3 << 20) + 12345  # not a whole number of slots: what is allocated is less
    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(kv_cache_bytes=budget, max_batch_size=64,
                                                                   attention="sdpa"))
    registry = CollectorRegistry()
    registry.register(_EngineCollector(lambda: engine, lambda: None, lambda: None, max_warm=0))
    found = {s.name: s.value for f in text_string_to_metric_families(generate_latest(registry).decode())
             for s in f.samples}
    held = sum(t.numel() * t.element_size() for t in (*engine.cache.k, *engine.cache.v))
    assert found["promptfleet_kv_cache_allocated_bytes"] == held
    assert found["promptfleet_kv_cache_budget_bytes"] == budget
    assert held < budget

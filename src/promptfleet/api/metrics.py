"""Prometheus metrics on a per-app ``CollectorRegistry`` (never the global default one,
so several apps can live in one process). Engine and adapter-cache figures are read at
scrape time by a custom collector; request figures are counted as requests finish."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from promptfleet.adapters.device_cache import AdapterCache
from promptfleet.adapters.prefix_store import PrefixStore
from promptfleet.platform.engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class _EngineCollector(Collector):
    def __init__(self, engine: Callable[[], Engine | None], adapter_cache: Callable[[], AdapterCache | None],
                 prefix_store: Callable[[], PrefixStore | None]) -> None:
        self._engine = engine
        self._adapter_cache = adapter_cache
        self._prefix_store = prefix_store

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is not None:
            s = engine.stats()
            for name, doc, value in (
                    ("promptfleet_engine_running", "Sequences in the running batch.", s.running),
                    ("promptfleet_engine_waiting", "Requests waiting for admission (queue depth).", s.waiting),
                    ("promptfleet_kv_cache_reserved_tokens", "KV-cache tokens reserved by admitted sequences.",
                     s.kv_reserved_tokens),
                    ("promptfleet_kv_cache_budget_tokens", "KV-cache admission budget in tokens.",
                     s.kv_budget_tokens)):
                yield GaugeMetricFamily(name, doc, value=value)
            usage = s.kv_reserved_tokens / s.kv_budget_tokens if s.kv_budget_tokens else 0.0
            yield GaugeMetricFamily("promptfleet_kv_cache_usage_ratio", "Reserved / budget KV tokens.", value=usage)
            yield CounterMetricFamily("promptfleet_engine_steps", "Engine loop steps.", value=s.steps)
            yield CounterMetricFamily("promptfleet_engine_decode_seconds", "Seconds in decode-only engine steps.",
                                      value=s.decode_seconds)
            yield CounterMetricFamily("promptfleet_engine_prefill_seconds",
                                      "Seconds in engine steps that carried prompt tokens.", value=s.prefill_seconds)
        cache = self._adapter_cache()
        if cache is not None:
            c = cache.stats()
            yield CounterMetricFamily("promptfleet_adapter_cache_hits", "Adapter device-cache hits.", value=c.hits)
            yield CounterMetricFamily("promptfleet_adapter_cache_misses", "Adapter device-cache misses.",
                                      value=c.misses)
            yield CounterMetricFamily("promptfleet_adapter_cache_evictions", "Adapter device-cache evictions.",
                                      value=c.evictions)
            yield GaugeMetricFamily("promptfleet_adapter_cache_entries", "Adapters in the device cache.",
                                    value=c.entries)
            yield GaugeMetricFamily("promptfleet_adapter_cache_bytes", "Bytes used by the device cache.",
                                    value=c.bytes_used)
        store = self._prefix_store()
        if store is not None:
            yield CounterMetricFamily("promptfleet_prefix_store_hits", "Prefixes read from the disk tier.",
                                      value=store.hits)
            yield CounterMetricFamily("promptfleet_prefix_store_misses", "Prefixes not on disk (built).",
                                      value=store.misses)


class Metrics:
    """Every metric of one app. ``tenant`` labels are tenant names; ``model`` labels are
    the base model id or an adapter name (never an unresolved client string)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("promptfleet_http_requests", "HTTP requests by route and status.",
                                     ["method", "route", "status"], registry=r)
        self.requests = Counter("promptfleet_completion_requests", "Completion requests by tenant, model and status.",
                                ["tenant", "model", "status"], registry=r)
        self.latency = Histogram("promptfleet_completion_latency_seconds",
                                 "Completion request latency (to the last token).", ["tenant", "model"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("promptfleet_time_to_first_token_seconds", "Time to the first token.",
                              ["tenant", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("promptfleet_time_per_output_token_seconds",
                              "After the first token, seconds per further token of a choice (inter-token latency).",
                              ["tenant", "model"], buckets=_TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("promptfleet_prompt_tokens", "Prompt tokens processed.",
                                     ["tenant", "model"], registry=r)
        self.completion_tokens = Counter("promptfleet_completion_tokens", "Completion tokens generated.",
                                         ["tenant", "model"], registry=r)
        self.gen_cache_hits = Counter("promptfleet_generation_cache_hits",
                                      "Choices answered from the generation cache.", ["tenant", "model"], registry=r)
        self.gen_cache_misses = Counter("promptfleet_generation_cache_misses",
                                        "Cacheable choices that had to be generated.", ["tenant", "model"],
                                        registry=r)
        self.rejected = Counter("promptfleet_rejected_requests", "Requests refused by limits.",
                                ["tenant", "reason"], registry=r)
        self._engine: Engine | None = None
        self._adapter_cache: AdapterCache | None = None
        self._prefix_store: PrefixStore | None = None
        r.register(_EngineCollector(lambda: self._engine, lambda: self._adapter_cache, lambda: self._prefix_store))

    def bind(self, *, engine: Engine | None, adapter_cache: AdapterCache | None,
             prefix_store: PrefixStore | None = None) -> None:
        self._engine = engine
        self._adapter_cache = adapter_cache
        self._prefix_store = prefix_store

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics on a per-app ``CollectorRegistry`` (never the global default one,
so several apps can live in one process). Engine and adapter-cache figures are read at
scrape time by a custom collector; request figures are counted as requests finish.

Label values a tenant or client chooses (adapter names, tenant names, HTTP methods) are
bounded: each such label keeps its first N distinct values and counts every later one
under ``_other``, so nobody can grow the number of series without limit.

Every sample carries a ``replica`` label (settings ``replica_id``, default the hostname),
and ``promptfleet_adapter_warm`` lists the adapters warm in this replica's device cache
(by adapter sha256, most recently used first, at most ``metrics_max_models`` of them), so a
router can prefer a warm replica and an autoscaler can tell replicas apart."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from promptfleet.adapters.device_cache import AdapterCache
from promptfleet.adapters.prefix_store import PrefixStore
from promptfleet.adapters.service import split_cache_key
from promptfleet.platform.engine import Engine
from promptfleet.settings import Settings

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)

OVERFLOW_LABEL = "_other"  # no adapter or tenant name can start with '_'
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

M = TypeVar("M", Counter, Histogram)


class LabelBound:
    """One label's allowed values: the first ``limit`` distinct values seen stay as they
    are, every later one becomes ``OVERFLOW_LABEL``. Thread-safe (requests finish on many
    threads); values in ``always`` pass and do not count against the limit."""

    def __init__(self, limit: int, *, always: Sequence[str] = ()) -> None:
        if limit < 1:
            raise ValueError(f"a label bound needs a limit >= 1, not {limit}")
        self.limit = limit
        self._always = frozenset(always)
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._always or value in self._seen:
            return value
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return OVERFLOW_LABEL


def known_method(method: str) -> str:
    """HTTP methods are client-chosen tokens: the standard ones, else ``OVERFLOW_LABEL``."""
    return method if method in HTTP_METHODS else OVERFLOW_LABEL


class BoundedMetric(Generic[M]):
    """A labelled metric whose ``labels(...)`` passes each value through its bound first
    (``None``: a label the server chooses, kept as is)."""

    def __init__(self, metric: M, bounds: Sequence[Callable[[str], str] | None]) -> None:
        if len(bounds) != len(metric._labelnames):
            raise ValueError(f"{len(bounds)} bounds for labels {metric._labelnames}")
        self.metric = metric
        self._bounds = tuple(bounds)

    def labels(self, *values: Any) -> M:
        if len(values) != len(self._bounds):
            raise ValueError(f"expected {len(self._bounds)} label values, got {len(values)}")
        return self.metric.labels(*(str(v) if b is None else b(str(v)) for b, v in zip(self._bounds, values)))


@dataclass(frozen=True)
class MetricLabelLimits:
    """How many distinct values the tenant-chosen labels keep (settings ``metrics_max_*``).
    ``base_model`` (the base model id) is always its own ``model`` value, never crowded out
    by adapter names."""
    max_models: int = 100
    max_tenants: int = 100
    base_model: str | None = None
    replica: str | None = None  # the 'replica' label every sample carries (settings replica_id)

    @classmethod
    def from_settings(cls, settings: Settings) -> MetricLabelLimits:
        return cls(max_models=settings.metrics_max_models, max_tenants=settings.metrics_max_tenants,
                   base_model=settings.model_id, replica=settings.replica_id)


class _EngineCollector(Collector):
    def __init__(self, engine: Callable[[], Engine | None], adapter_cache: Callable[[], AdapterCache | None],
                 prefix_store: Callable[[], PrefixStore | None], max_warm: int) -> None:
        self._engine = engine
        self._adapter_cache = adapter_cache
        self._prefix_store = prefix_store
        self._max_warm = max_warm

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
                     s.kv_budget_tokens),
                    ("promptfleet_kv_cache_allocated_bytes", "Bytes the KV cache allocated on the engine's device.",
                     s.kv_allocated_bytes),
                    ("promptfleet_kv_cache_budget_bytes", "The KV cache's byte budget (kv_cache_bytes).",
                     s.kv_budget_bytes)):
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
            warm = GaugeMetricFamily("promptfleet_adapter_warm", "Adapters whose KV prefix is warm in this "
                                     "replica's device cache (bytes it holds), most recently used first.",
                                     labels=["adapter_sha256", "base"])
            for entry in cache.entries()[:self._max_warm]:
                warm.add_metric(list(split_cache_key(entry.key)), entry.nbytes)
            yield warm
        store = self._prefix_store()
        if store is not None:
            yield CounterMetricFamily("promptfleet_prefix_store_hits", "Prefixes read from the disk tier.",
                                      value=store.hits)
            yield CounterMetricFamily("promptfleet_prefix_store_misses", "Prefixes not on disk (built).",
                                      value=store.misses)


class Metrics:
    """Every metric of one app. ``tenant`` labels are tenant names; ``model`` labels are
    the base model id or an adapter name (never an unresolved client string); both are
    bounded by ``limits`` (shared across every metric, so one bound caps every family)."""

    def __init__(self, limits: MetricLabelLimits | None = None) -> None:
        self.limits = limits or MetricLabelLimits()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        tenant = LabelBound(self.limits.max_tenants)
        base = (self.limits.base_model,) if self.limits.base_model else ()
        model = LabelBound(self.limits.max_models, always=base)
        tm = (tenant, model)
        self.http_requests = BoundedMetric(Counter("promptfleet_http_requests", "HTTP requests by route and status.",
                                                   ["method", "route", "status"], registry=r),
                                           (known_method, None, None))
        self.requests = BoundedMetric(Counter("promptfleet_completion_requests",
                                              "Completion requests by tenant, model and status.",
                                              ["tenant", "model", "status"], registry=r), (tenant, model, None))
        self.latency = BoundedMetric(Histogram("promptfleet_completion_latency_seconds",
                                               "Completion request latency (to the last token).", ["tenant", "model"],
                                               buckets=_LATENCY_BUCKETS, registry=r), tm)
        self.ttft = BoundedMetric(Histogram("promptfleet_time_to_first_token_seconds", "Time to the first token.",
                                            ["tenant", "model"], buckets=_LATENCY_BUCKETS, registry=r), tm)
        self.tpot = BoundedMetric(Histogram("promptfleet_time_per_output_token_seconds",
                                            "After the first token, seconds per further token of a choice "
                                            "(inter-token latency).", ["tenant", "model"], buckets=_TPOT_BUCKETS,
                                            registry=r), tm)
        self.prompt_tokens = BoundedMetric(Counter("promptfleet_prompt_tokens", "Prompt tokens processed.",
                                                   ["tenant", "model"], registry=r), tm)
        self.completion_tokens = BoundedMetric(Counter("promptfleet_completion_tokens",
                                                       "Completion tokens generated.", ["tenant", "model"],
                                                       registry=r), tm)
        self.gen_cache_hits = BoundedMetric(Counter("promptfleet_generation_cache_hits",
                                                    "Choices answered from the generation cache.",
                                                    ["tenant", "model"], registry=r), tm)
        self.gen_cache_misses = BoundedMetric(Counter("promptfleet_generation_cache_misses",
                                                      "Cacheable choices that had to be generated.",
                                                      ["tenant", "model"], registry=r), tm)
        self.rejected = BoundedMetric(Counter("promptfleet_rejected_requests", "Requests refused by limits.",
                                              ["tenant", "reason"], registry=r), (tenant, None))
        self._engine: Engine | None = None
        self._adapter_cache: AdapterCache | None = None
        self._prefix_store: PrefixStore | None = None
        r.register(_EngineCollector(lambda: self._engine, lambda: self._adapter_cache, lambda: self._prefix_store,
                                    max_warm=self.limits.max_models))
        self._exposed = _ReplicaLabelled(r, self.limits.replica) if self.limits.replica else r

    def bind(self, *, engine: Engine | None, adapter_cache: AdapterCache | None,
             prefix_store: PrefixStore | None = None) -> None:
        self._engine = engine
        self._adapter_cache = adapter_cache
        self._prefix_store = prefix_store

    def render(self) -> bytes:
        return generate_latest(self._exposed)  # type: ignore[arg-type]


class _ReplicaLabelled:
    """A registry's metrics with ``replica=<name>`` added to every sample (what
    ``generate_latest`` reads: anything with ``collect()``)."""

    def __init__(self, registry: CollectorRegistry, replica: str) -> None:
        self._registry = registry
        self._replica = replica

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            out.samples = [s._replace(labels={**s.labels, "replica": self._replica}) for s in metric.samples]
            yield out

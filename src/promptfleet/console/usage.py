"""``GET /console/api/usage``: the signed-in tenant's usage per model (the base model and
each adapter), read from this server's own Prometheus counters (``api.metrics``):
requests by status, prompt and completion tokens, and latency percentiles estimated from
the latency histogram the way Prometheus' ``histogram_quantile`` does.

The counters are this process's since it started (one replica; past one, sum the replicas'
``/metrics`` in Prometheus)."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from fastapi import APIRouter, Request
from pydantic import BaseModel

from promptfleet.api.deps import LimitedTenantDep
from promptfleet.api.responses import error_responses

router = APIRouter(prefix="/console/api", tags=["console"])

QUANTILES = (0.5, 0.9, 0.99)


class ModelUsage(BaseModel):
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    latency_p50_s: float | None
    latency_p90_s: float | None
    latency_p99_s: float | None


class UsageOut(BaseModel):
    tenant: str
    data: list[ModelUsage]
    since: str = "server start"


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' estimate: ``buckets`` are (upper bound, cumulative count) sorted by bound,
    the last one ``+Inf``. Linear inside the bucket holding rank ``q * total``; a rank in
    the ``+Inf`` bucket answers the highest finite bound. None when nothing was observed."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _samples(metrics, family: str) -> Iterable:
    for metric in metrics.registry.collect():
        if metric.name == family:
            yield from metric.samples


def tenant_usage(metrics, tenant: str) -> list[ModelUsage]:
    """Per model label of ``tenant``: what the counters hold, sorted by model."""
    requests: dict[str, int] = defaultdict(int)
    errors: dict[str, int] = defaultdict(int)
    tokens: dict[tuple[str, str], int] = defaultdict(int)
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s in _samples(metrics, "promptfleet_completion_requests"):
        if s.name.endswith("_total") and s.labels.get("tenant") == tenant:
            model = s.labels["model"]
            requests[model] += int(s.value)
            if not s.labels.get("status", "").startswith("2"):
                errors[model] += int(s.value)
    for kind in ("prompt", "completion"):
        for s in _samples(metrics, f"promptfleet_{kind}_tokens"):
            if s.name.endswith("_total") and s.labels.get("tenant") == tenant:
                tokens[(s.labels["model"], kind)] += int(s.value)
    for s in _samples(metrics, "promptfleet_completion_latency_seconds"):
        if s.name.endswith("_bucket") and s.labels.get("tenant") == tenant:
            buckets[s.labels["model"]].append((float(s.labels["le"]), s.value))
    out = []
    for model in sorted(set(requests) | {m for m, _ in tokens}):
        b = sorted(buckets.get(model, []))
        p50, p90, p99 = (histogram_quantile(q, b) for q in QUANTILES)
        out.append(ModelUsage(model=model, requests=requests[model], errors=errors[model],
                              prompt_tokens=tokens[(model, "prompt")], completion_tokens=tokens[(model, "completion")],
                              latency_p50_s=p50, latency_p90_s=p90, latency_p99_s=p99))
    return out


@router.get("/usage", response_model=UsageOut, responses=error_responses(401, 429))
def get_usage(tenant: LimitedTenantDep, request: Request) -> UsageOut:
    """The signed-in tenant's completions per model since this server started."""
    return UsageOut(tenant=tenant.name, data=tenant_usage(request.app.state.metrics, tenant.name))

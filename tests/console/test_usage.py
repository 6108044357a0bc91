"""The usage route's arithmetic: percentiles from histogram buckets as Prometheus'
``histogram_quantile`` defines them (worked by hand below), and one tenant's counters
read out of a real ``Metrics`` registry without another tenant's."""
from __future__ import annotations

import math

import pytest

from promptfleet.api.metrics import Metrics
from promptfleet.console.usage import histogram_quantile, tenant_usage

INF = math.inf


@pytest.mark.parametrize("q, expected", [
    (0.5, 0.1),    # rank 2 of 4: the top of the first bucket (0, 0.1] holding 2
    (0.75, 0.3),   # rank 3: half-way through (0.1, 0.5] holding 2 more
    (0.9, 0.42),   # rank 3.6: 0.1 + 0.4 * 1.6 / 2
])
def test_histogram_quantile_interpolates_inside_the_bucket(q, expected):
    assert histogram_quantile(q, [(0.1, 2), (0.5, 4), (1.0, 4), (INF, 4)]) == pytest.approx(expected)


def test_histogram_quantile_edges():
    assert histogram_quantile(0.5, [(0.1, 0), (INF, 0)]) is None      # nothing observed
    assert histogram_quantile(0.99, [(0.1, 1), (1.0, 1), (INF, 5)]) == 1.0  # in +Inf: the highest finite bound


def test_tenant_usage_reads_only_that_tenants_counters():
    m = Metrics()
    for status, n in (("200", 3), ("429", 1)):
        for _ in range(n):
            m.requests.labels("alice", "gpt2", status).inc()
    m.requests.labels("alice", "mine", "200").inc()
    m.requests.labels("bob", "gpt2", "200").inc(7)
    m.prompt_tokens.labels("alice", "gpt2").inc(30)
    m.completion_tokens.labels("alice", "gpt2").inc(12)
    m.completion_tokens.labels("bob", "gpt2").inc(1000)
    for seconds in (0.003, 0.004, 0.2):  # buckets 0.005 (2) and 0.25 (1)
        m.latency.labels("alice", "gpt2").observe(seconds)
    usage = {u.model: u for u in tenant_usage(m, "alice")}
    assert sorted(usage) == ["gpt2", "mine"]
    gpt2 = usage["gpt2"]
    assert (gpt2.requests, gpt2.errors, gpt2.prompt_tokens, gpt2.completion_tokens) == (4, 1, 30, 12)
    # rank 1.5 of 3 in (0, 0.005] holding 2 -> 0.005 * 1.5 / 2; rank 2.97 in (0.1, 0.25] holding 1
    assert gpt2.latency_p50_s == pytest.approx(0.00375)
    assert gpt2.latency_p99_s == pytest.approx(0.1 + 0.15 * 0.97)
    assert usage["mine"].requests == 1 and usage["mine"].latency_p50_s is None
    assert tenant_usage(m, "carol") == []

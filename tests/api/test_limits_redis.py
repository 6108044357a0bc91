"""The Redis-backed tenant limiter against a real Redis: two limiters stand for two API
replicas and must share one budget (the in-process limiter would give each its own), a
dead replica's slots come back when their lease ends, and with Redis unreachable each
process still limits on its own instead of letting everything through."""
from __future__ import annotations

import uuid

import pytest

from promptfleet.api.limits import LimitExceeded, TenantLimiter, TenantLimits
from promptfleet.api.limits_redis import RedisTenantLimiter
from promptfleet.testing.polling import wait_for

pytestmark = pytest.mark.redis


@pytest.fixture
def replicas(limits_redis_url):
    prefix = f"test-{uuid.uuid4().hex}"
    pair = [RedisTenantLimiter(limits_redis_url, prefix=prefix) for _ in range(2)]
    yield pair
    for lim in pair:
        lim.close()


def test_replicas_share_one_rate_bucket(replicas):
    a, b = replicas
    limits = TenantLimits(max_concurrent=10, rate_per_s=0.01, burst=3)
    a.check_rate("t", limits)
    b.check_rate("t", limits)
    a.check_rate("t", limits)
    for lim in (a, b):
        with pytest.raises(LimitExceeded, match="rate limit exceeded") as exc:
            lim.check_rate("t", limits)
        assert 90 < exc.value.retry_after <= 100  # one token at 0.01/s
    b.check_rate("u", limits)  # another tenant, another bucket
    # the per-process limiter, for contrast, gives each replica the whole burst
    local = [TenantLimiter(), TenantLimiter()]
    for lim in local:
        for _ in range(3):
            lim.check_rate("t", limits)


def test_a_refilled_bucket_admits_again(replicas):
    a, b = replicas
    limits = TenantLimits(max_concurrent=10, rate_per_s=0.5, burst=1)  # refused for 2 s after each token
    a.check_rate("t", limits)
    with pytest.raises(LimitExceeded):
        b.check_rate("t", limits)

    def admitted() -> bool:
        try:
            b.check_rate("t", limits)
        except LimitExceeded:
            return False
        return True

    # the other replica is admitted once the shared bucket has refilled (no fixed sleep)
    wait_for(admitted, timeout=30, interval=0.1, what="the shared bucket to refill")


def test_replicas_share_the_concurrency_cap(replicas):
    a, b = replicas
    limits = TenantLimits(max_concurrent=2, rate_per_s=1, burst=1)
    first, second = a.acquire("t", limits), b.acquire("t", limits)
    assert a.active("t") == b.active("t") == 2
    with pytest.raises(LimitExceeded, match="already has 2 in flight"):
        a.acquire("t", limits)
    b.acquire("u", limits).release()
    first.release()
    first.release()  # idempotent
    assert b.active("t") == 1
    b.acquire("t", limits).release()
    second.release()
    assert a.active("t") == 0


def test_a_dead_replicas_slots_come_back_after_the_lease(limits_redis_url):
    prefix = f"test-{uuid.uuid4().hex}"
    dying = RedisTenantLimiter(limits_redis_url, prefix=prefix, lease_s=3)
    alive = RedisTenantLimiter(limits_redis_url, prefix=prefix, lease_s=3)
    limits = TenantLimits(max_concurrent=1, rate_per_s=1, burst=1)
    dying.acquire("t", limits)  # never released: its replica "died"
    with pytest.raises(LimitExceeded):
        alive.acquire("t", limits)
    wait_for(lambda: alive.active("t") == 0, timeout=60, interval=0.1, what="the dead replica's lease to end")
    alive.acquire("t", limits).release()
    dying.close()
    alive.close()


def test_unreachable_redis_limits_per_process(caplog):
    lim = RedisTenantLimiter("redis://127.0.0.1:1/0", prefix="never")
    limits = TenantLimits(max_concurrent=1, rate_per_s=0.01, burst=2)
    lim.check_rate("t", limits)
    lim.check_rate("t", limits)
    with pytest.raises(LimitExceeded):  # limited, not waved through
        lim.check_rate("t", limits)
    slot = lim.acquire("t", limits)
    with pytest.raises(LimitExceeded):
        lim.acquire("t", limits)
    slot.release()
    assert lim.active("t") == 0
    assert sum("unreachable" in r.message for r in caplog.records) == 1  # warned once, not per request
    lim.close()

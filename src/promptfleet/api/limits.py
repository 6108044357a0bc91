"""Per-tenant admission limits: a token-bucket request rate and a concurrency cap.

Both are in-process here (``TenantLimiter``; ``limits_redis.RedisTenantLimiter`` counts
them in Redis, shared by every replica); each tenant's own values come from its row
(``max_concurrent``, ``rate_per_s``, ``rate_burst``) or else the settings' defaults.
Refusals carry the seconds after which a retry can succeed (the ``Retry-After`` header).
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


class LimitExceeded(Exception):
    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class TenantLimits:
    max_concurrent: int
    rate_per_s: float
    burst: int


def rate_is_zero() -> LimitExceeded:
    return LimitExceeded("this tenant's request rate limit is 0", retry_after=60.0)


def rate_exceeded(limits: TenantLimits, wait: float) -> LimitExceeded:
    return LimitExceeded(f"rate limit exceeded: at most {limits.rate_per_s:g} requests per second "
                         f"(burst {limits.burst}) per tenant; retry in {wait:.2f} s", retry_after=min(wait, 3600.0))


def too_many_in_flight(active: int, limits: TenantLimits) -> LimitExceeded:
    return LimitExceeded(f"too many concurrent requests: this tenant already has {active} in flight "
                         f"(limit {limits.max_concurrent})", retry_after=1.0)


class Slot(Protocol):
    def release(self) -> None: ...


class Limiter(Protocol):
    """What the API asks of a limiter (``TenantLimiter``, ``RedisTenantLimiter``)."""

    def check_rate(self, tenant_id: str, limits: TenantLimits) -> None: ...

    def acquire(self, tenant_id: str, limits: TenantLimits) -> Slot: ...

    def active(self, tenant_id: str) -> int: ...


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; each request takes one."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one is available."""
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        if self.rate <= 0:
            return math.inf
        return (1.0 - self.tokens) / self.rate


class ConcurrencySlot:
    """One admitted request; ``release()`` is idempotent."""

    def __init__(self, limiter: "TenantLimiter", tenant_id: str) -> None:
        self._limiter = limiter
        self._tenant_id = tenant_id
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self._tenant_id)


class TenantLimiter:
    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self._active: dict[str, int] = {}

    def check_rate(self, tenant_id: str, limits: TenantLimits) -> None:
        """Take one token from the tenant's bucket or raise ``LimitExceeded``."""
        if limits.rate_per_s <= 0 and limits.burst <= 0:
            raise rate_is_zero()
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(tenant_id)
            if bucket is None or bucket.rate != limits.rate_per_s or bucket.burst != limits.burst:
                bucket = self._buckets[tenant_id] = TokenBucket(limits.rate_per_s, limits.burst, now)
            wait = bucket.take(now)
        if wait > 0:
            raise rate_exceeded(limits, wait)

    def acquire(self, tenant_id: str, limits: TenantLimits) -> ConcurrencySlot:
        """Admit one more concurrent request of the tenant or raise ``LimitExceeded``."""
        with self._lock:
            active = self._active.get(tenant_id, 0)
            if active >= limits.max_concurrent:
                raise too_many_in_flight(active, limits)
            self._active[tenant_id] = active + 1
        return ConcurrencySlot(self, tenant_id)

    def _release(self, tenant_id: str) -> None:
        with self._lock:
            left = self._active.get(tenant_id, 0) - 1
            if left > 0:
                self._active[tenant_id] = left
            else:
                self._active.pop(tenant_id, None)

    def active(self, tenant_id: str) -> int:
        with self._lock:
            return self._active.get(tenant_id, 0)

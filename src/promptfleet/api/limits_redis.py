"""Per-tenant admission limits shared by every API replica, kept in Redis.

The same two limits as ``limits.TenantLimiter`` (a token-bucket request rate and a cap on
requests in flight), with the same ``LimitExceeded`` refusals, but counted in Redis so N
replicas behind a load balancer admit what one would, not N times as much. Each check is
one Lua script (atomic; Redis's own clock, so replicas' clocks do not matter):

- rate: a hash ``{tokens, stamp}`` per tenant, refilled at ``rate`` per second;
- concurrency: a sorted set per tenant of in-flight request ids scored by the end of
  their lease (``lease_s``), so a replica that dies mid-request leaks its slots for at
  most the lease, not forever.

If Redis cannot be reached, requests are limited per process by an in-process
``TenantLimiter`` (a warning is logged, at most once a minute) rather than refused.
Enabled by ``PROMPTFLEET_LIMITS_REDIS_URL``.
"""
from __future__ import annotations

import logging
import math
import time
import uuid

import redis

from promptfleet.api.limits import (Slot, TenantLimiter, TenantLimits, rate_exceeded, rate_is_zero,
                                     too_many_in_flight)

log = logging.getLogger(__name__)

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000 "

_RATE = _NOW + """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens, stamp = tonumber(v[1]), tonumber(v[2])
if tokens == nil or stamp == nil then tokens, stamp = burst, now end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 elseif rate <= 0 then wait = -1 else wait = (1 - tokens) / rate end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('EXPIRE', KEYS[1], rate > 0 and math.ceil(burst / rate) + 60 or 3600)
return tostring(wait)
"""

_ACQUIRE = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local n = redis.call('ZCARD', KEYS[1])
if n >= tonumber(ARGV[1]) then return n end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3])) + 60)
return -1
"""

_ACTIVE = _NOW + "return redis.call('ZCOUNT', KEYS[1], now, '+inf')"


class RedisSlot:
    """One admitted request; ``release()`` is idempotent."""

    def __init__(self, limiter: "RedisTenantLimiter", key: str, member: str) -> None:
        self._limiter, self._key, self._member = limiter, key, member
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self._key, self._member)


class RedisTenantLimiter:
    def __init__(self, url: str, *, prefix: str = "promptfleet:limits", lease_s: float = 900.0,
                 fallback: TenantLimiter | None = None) -> None:
        self._redis = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        self._prefix, self._lease_s = prefix, lease_s
        self._rate = self._redis.register_script(_RATE)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._active = self._redis.register_script(_ACTIVE)
        self._fallback = fallback or TenantLimiter()
        self._warned_at = -math.inf

    def _down(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at > 60:
            self._warned_at = now
            log.warning("Redis for tenant limits unreachable (%s): limiting per process until it is back", exc)

    def check_rate(self, tenant_id: str, limits: TenantLimits) -> None:
        """Take one token from the tenant's shared bucket or raise ``LimitExceeded``."""
        if limits.rate_per_s <= 0 and limits.burst <= 0:
            raise rate_is_zero()
        try:
            wait = float(self._rate(keys=[f"{self._prefix}:rate:{tenant_id}"], args=[limits.rate_per_s, limits.burst]))
        except redis.RedisError as exc:
            self._down(exc)
            return self._fallback.check_rate(tenant_id, limits)
        if wait != 0:
            raise rate_exceeded(limits, math.inf if wait < 0 else wait)

    def acquire(self, tenant_id: str, limits: TenantLimits) -> Slot:
        """Admit one more concurrent request of the tenant, across replicas, or raise ``LimitExceeded``."""
        key, member = f"{self._prefix}:active:{tenant_id}", uuid.uuid4().hex
        try:
            active = int(self._acquire(keys=[key], args=[limits.max_concurrent, member, self._lease_s]))
        except redis.RedisError as exc:
            self._down(exc)
            return self._fallback.acquire(tenant_id, limits)
        if active >= 0:
            raise too_many_in_flight(active, limits)
        return RedisSlot(self, key, member)

    def _release(self, key: str, member: str) -> None:
        try:
            self._redis.zrem(key, member)
        except redis.RedisError as exc:  # the lease runs out instead
            self._down(exc)

    def active(self, tenant_id: str) -> int:
        try:
            return int(self._active(keys=[f"{self._prefix}:active:{tenant_id}"]))
        except redis.RedisError as exc:
            self._down(exc)
            return self._fallback.active(tenant_id)

    def close(self) -> None:
        self._redis.close()

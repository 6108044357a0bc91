"""Per-tenant rate and concurrency limits (429 + Retry-After) and the engine's full queue
(503 + Retry-After), through the app with the in-process and the Redis limiter; plus the
in-process limiter itself on a fake clock."""
from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from promptfleet.api.limits import LimitExceeded, TenantLimiter, TenantLimits
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.testing.engine_gate import StepGate
from promptfleet.testing.polling import wait_for_async

LONG = {"model": "gpt2", "prompt": "Hello", "max_tokens": 200, "temperature": 0, "ignore_eos": True}


@pytest.fixture(params=["process", pytest.param("redis", marks=pytest.mark.redis)])
def limit_settings(request) -> dict:
    """Settings for each limiter: counted per process, or in Redis (a fresh key prefix)."""
    if request.param == "process":
        return {}
    url = request.getfixturevalue("limits_redis_url")
    return {"limits_redis_url": url, "limits_redis_prefix": f"test-{uuid.uuid4().hex}"}


def test_token_bucket_on_a_fake_clock():
    now = [100.0]
    lim = TenantLimiter(clock=lambda: now[0])
    limits = TenantLimits(max_concurrent=10, rate_per_s=2.0, burst=3)
    for _ in range(3):
        lim.check_rate("a", limits)
    with pytest.raises(LimitExceeded) as exc:
        lim.check_rate("a", limits)
    assert exc.value.retry_after == pytest.approx(0.5)
    lim.check_rate("b", limits)  # tenants have their own buckets
    now[0] += 0.5
    lim.check_rate("a", limits)
    with pytest.raises(LimitExceeded):
        lim.check_rate("a", limits)
    now[0] += 100  # refills up to the burst, not beyond
    for _ in range(3):
        lim.check_rate("a", limits)
    with pytest.raises(LimitExceeded):
        lim.check_rate("a", limits)


def test_concurrency_slots():
    lim = TenantLimiter()
    limits = TenantLimits(max_concurrent=2, rate_per_s=1, burst=1)
    a, b = lim.acquire("t", limits), lim.acquire("t", limits)
    with pytest.raises(LimitExceeded):
        lim.acquire("t", limits)
    lim.acquire("u", limits).release()
    a.release()
    a.release()  # idempotent
    assert lim.active("t") == 1
    lim.acquire("t", limits)
    b.release()


def test_rate_limit_is_429_with_retry_after(make_api, limit_settings):
    api = make_api(**limit_settings)
    tid, h = api.new_tenant(rate_per_s=0.01, rate_burst=2)  # one token per 100 s: no stall refills it
    assert api.client.get("/v1/models", headers=h).status_code == 200
    assert api.client.get("/v1/adapters", headers=h).status_code == 200
    r = api.client.post("/v1/completions", json={"model": "gpt2", "prompt": "x"}, headers=h)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 90 <= int(r.headers["retry-after"]) <= 100
    # another tenant is not affected
    _, other = api.new_tenant()
    assert api.client.get("/v1/models", headers=other).status_code == 200
    rejected = [s for f in text_string_to_metric_families(api.client.get("/metrics").text) for s in f.samples
                if s.name == "promptfleet_rejected_requests_total"]
    assert [s.labels["reason"] for s in rejected] == ["rate"] and rejected[0].value == 1, rejected


async def test_concurrency_cap_is_429(make_api, limit_settings):
    api = make_api(max_tokens_limit=400, **limit_settings)
    tid, h = api.new_tenant(max_concurrent=1)
    transport = httpx.ASGITransport(app=api.app)
    # the engine is held between steps, so the first request is in flight by construction
    with StepGate(api.engine, allow=1) as gate:
        async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=120) as client:
            first = asyncio.create_task(client.post("/v1/completions", json={**LONG, "max_tokens": 8}, headers=h))
            await wait_for_async(lambda: api.state.limiter.active(tid) == 1 and gate.held,
                                 what="the first request to hold the tenant's one slot at the held engine")
            second = await client.post("/v1/completions", json={**LONG, "max_tokens": 2}, headers=h)
            assert second.status_code == 429, second.text
            assert second.headers["retry-after"] == "1"
            assert "concurrent" in second.json()["error"]["message"]
            gate.open()
            assert (await first).status_code == 200
            assert api.state.limiter.active(tid) == 0
            assert (await client.post("/v1/completions", json={**LONG, "max_tokens": 2}, headers=h)).status_code == 200


async def test_full_engine_queue_is_503_with_retry_after(make_api, small_checkpoint):
    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(max_queue=1, max_batch_size=1))
    try:
        api = make_api(engine=engine, max_tokens_limit=400)
        _, h = api.new_tenant()
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=120) as client:
            with StepGate(engine, allow=1) as gate:  # the first request runs one step, then the engine waits
                first = asyncio.create_task(client.post("/v1/completions", json={**LONG, "max_tokens": 8},
                                                        headers=h))
                await wait_for_async(lambda: engine.stats().running == 1 and gate.held,
                                     what="the first request to be running at the held engine")
                rest = [asyncio.create_task(client.post("/v1/completions", json={**LONG, "max_tokens": 4},
                                                        headers=h)) for _ in range(3)]
                # one takes the single queue place; the other two are refused while the first still runs
                await wait_for_async(lambda: sum(t.done() for t in rest) == 2,
                                     what="two of three requests to be refused by the full queue")
                assert engine.stats().waiting == 1 and engine.stats().running == 1
                gate.open()
                done = await asyncio.gather(*rest)
            statuses = sorted(r.status_code for r in done)
            assert statuses == [200, 503, 503], [r.text for r in done]
            for r in done:
                if r.status_code == 503:
                    assert r.headers["retry-after"] == "1"
                    assert r.json()["error"]["code"] == "queue_full" and "queue is full" in r.json()["error"]["message"]
            assert (await first).status_code == 200
            stream = await client.post("/v1/completions", json={**LONG, "max_tokens": 4, "stream": True}, headers=h)
            assert stream.status_code == 200
        await wait_for_async(lambda: engine.stats().running == 0 and engine.stats().waiting == 0,
                             what="the engine to be idle")
    finally:
        engine.stop()


async def test_a_burst_of_requests_does_not_exhaust_the_db_pool(api):
    """64 requests at once: each holds a pooled DB connection only for its own queries, never
    while it waits for a worker thread or the engine (else the pool of 15 SQLite connections
    and the 40 worker threads starve each other until the pool's 30 s timeout)."""
    _, h = api.new_tenant()
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api", timeout=60) as client:
        async def one(i: int) -> int:
            r = await client.post("/v1/completions", headers=h, json={
                "model": "gpt2", "prompt": f"burst {i}", "max_tokens": 2, "temperature": 0, "stream": i % 2 == 0})
            return r.status_code

        statuses = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), timeout=25)
    assert statuses == [200] * 64
    assert api.state.db_engine.pool.checkedout() == 0

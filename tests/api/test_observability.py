"""Health, readiness, Prometheus metrics, structured logs with request ids (and never an
API key), and the body-size middleware on its own."""
from __future__ import annotations

import asyncio
import io
import json
import logging

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from promptfleet.api import create_app
from promptfleet.api.logs import configure_logging
from promptfleet.api.uploads import BodyLimit, BodyLimitMiddleware
from promptfleet.testing.api_app import api_settings, running_api


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_health_and_readiness(api, small_checkpoint, tmp_path):
    assert api.client.get("/healthz").json() == {"status": "ok", "checks": {}}
    r = api.client.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"model": "ok", "database": "ok"}
    # the database stops answering -> 503
    good = api.state.db_engine
    api.state.db_engine = create_engine(f"sqlite:///{tmp_path}/missing-dir/nope/x.db")
    try:
        r = api.client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert "database" in r.json()["error"]["message"] and r.headers["retry-after"]
    finally:
        api.state.db_engine = good
    # before the lifespan has run (model not loaded) -> 503
    app = create_app(api_settings(tmp_path / "cold", small_checkpoint))
    from fastapi.testclient import TestClient
    cold = TestClient(app)  # not entered: no lifespan
    assert cold.get("/readyz").status_code == 503
    assert cold.get("/healthz").status_code == 200
    assert cold.get("/v1/models", headers={"Authorization": "Bearer x"}).status_code == 503


def test_metrics(api, peft_zips):
    _, h = api.new_tenant("metered")
    name = next(t["name"] for t in api.client.get("/admin/tenants", headers=api.admin()).json()["data"]
                if t["name"].startswith("metered"))
    api.upload(h, "bot", peft_zips["pt"])
    for _ in range(2):
        r = api.client.post("/v1/completions", headers=h, json={"model": "bot", "prompt": "hi", "max_tokens": 3,
                                                                "temperature": 0})
        assert r.status_code == 200
    api.client.post("/v1/completions", headers=h, json={"model": "nope", "prompt": "hi"})
    r = api.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = samples(r.text)

    def value(metric: str, **labels) -> float:
        return sum(s.value for s in m.get(metric, []) if all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("promptfleet_completion_requests_total", tenant=name, model="bot", status="200") == 2
    assert value("promptfleet_completion_requests_total", tenant=name, model="unknown", status="404") == 1
    assert value("promptfleet_completion_latency_seconds_count", tenant=name, model="bot") == 2
    assert value("promptfleet_time_to_first_token_seconds_count", tenant=name, model="bot") == 1  # one was cached
    assert value("promptfleet_time_per_output_token_seconds_count", tenant=name, model="bot") == 1
    assert value("promptfleet_time_per_output_token_seconds_sum", tenant=name, model="bot") > 0
    assert value("promptfleet_engine_decode_seconds_total") > 0 and value("promptfleet_engine_prefill_seconds_total") > 0
    assert value("promptfleet_completion_tokens_total", tenant=name, model="bot") == 6
    assert value("promptfleet_prompt_tokens_total", tenant=name, model="bot") == 2 * len(api.engine.encode("hi"))
    assert value("promptfleet_generation_cache_hits_total", tenant=name, model="bot") == 1
    assert value("promptfleet_adapter_cache_misses_total") == 1 and value("promptfleet_adapter_cache_hits_total") >= 1
    for gauge in ("promptfleet_engine_running", "promptfleet_engine_waiting", "promptfleet_kv_cache_reserved_tokens",
                  "promptfleet_kv_cache_budget_tokens", "promptfleet_adapter_cache_evictions_total",
                  "promptfleet_adapter_cache_bytes"):
        assert gauge in m, gauge
    assert value("promptfleet_kv_cache_budget_tokens") > 0
    assert value("promptfleet_http_requests_total", route="/v1/completions", status="200") >= 2
    assert value("promptfleet_http_requests_total", route="/v1/adapters", method="POST", status="201") == 1


def test_metrics_key_when_set(make_api):
    api = make_api(metrics_key="scrape-me")
    assert api.client.get("/metrics").status_code == 401
    r = api.client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid metrics key"
    ok = api.client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert ok.status_code == 200 and "promptfleet_engine_running" in ok.text
    assert api.client.get("/healthz").status_code == 200  # probes stay open


def test_two_apps_in_one_process_have_their_own_metrics(make_api):
    a, b = make_api(), make_api()
    a.client.get("/healthz")
    count = lambda api: sum(s.value for s in samples(api.client.get("/metrics").text)  # noqa: E731
                            .get("promptfleet_http_requests_total", []) if s.labels["route"] == "/healthz")
    assert count(a) == 1 and count(b) == 0


def test_json_logs_carry_the_request_id_and_never_the_key(api):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(level="INFO", json_lines=True, stream=stream)
        _, h = api.new_tenant()
        key = h["Authorization"].split()[1]
        api.client.post("/v1/completions", headers={**h, "X-Request-ID": "req-42"},
                        json={"model": "gpt2", "prompt": "hi", "max_tokens": 2})
        api.client.get("/v1/models", headers={"Authorization": "Bearer pf-leaked-key-attempt"})
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines, "no log lines"
    access = [r for r in lines if r["logger"] == "promptfleet.access"]
    hit = next(r for r in access if r["request_id"] == "req-42")
    assert hit["path"] == "/v1/completions" and hit["status"] == 200 and hit["tenant"].startswith("t-")
    assert hit["duration_ms"] > 0 and hit["level"] == "INFO" and hit["time"]
    assert all(r["request_id"] != "-" for r in access)
    text = stream.getvalue()
    assert key not in text and "pf-leaked-key-attempt" not in text and "Bearer" not in text


def test_body_limit_middleware_stops_reading_at_the_cap():
    pulled = []
    chunks = [b"x" * 100] * 50

    async def receive():
        i = len(pulled)
        pulled.append(i)
        return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

    sent = []

    async def send(message):
        sent.append(message)

    async def app(scope, receive, send):  # reads the whole body, then answers 200
        more = True
        while more:
            more = (await receive()).get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    mw = BodyLimitMiddleware(app, limit_for=lambda m, p: BodyLimit(1000, "the test limit"))
    scope = {"type": "http", "method": "POST", "path": "/x", "headers": []}
    asyncio.run(mw(scope, receive, send))
    assert len(pulled) == 11  # stopped at the first chunk past 1000 bytes, never read the other 39
    assert sent[0]["status"] == 413 and b"the test limit" in sent[1]["body"]

    pulled.clear()
    sent.clear()
    scope["headers"] = [(b"content-length", b"5000")]
    asyncio.run(mw(scope, receive, send))
    assert pulled == [] and sent[0]["status"] == 413  # refused on the declared length alone

    pulled.clear()
    sent.clear()
    chunks[:] = [b"x" * 100] * 5
    scope["headers"] = []
    asyncio.run(mw(scope, receive, send))
    assert sent[0]["status"] == 200


def test_oversized_headers_get_431_in_openai_shape_and_normal_ones_pass(api):
    ok = api.client.get("/healthz", headers={"X-Note": "n" * 1000})
    assert ok.status_code == 200
    r = api.client.get("/healthz", headers={"X-Junk": "h" * (40 << 10)})
    assert r.status_code == 431, r.text
    err = r.json()["error"]
    assert err["code"] == "request_header_fields_too_large" and "32 KiB" in err["message"]


def test_adapter_prefixes_survive_a_restart_on_disk(make_api, small_checkpoint, tmp_path, api_engine,
                                                   peft_zips):
    """A restarted server reads an adapter's built KV prefix from the data dir's disk tier
    instead of recomputing it, and serves the same tokens."""
    settings = api_settings(tmp_path / "restart", small_checkpoint, generation_cache_enabled=False)
    body = {"model": "bot", "prompt": "restart", "max_tokens": 6, "temperature": 0}
    with running_api(settings, engine=api_engine) as api:
        _, h = api.new_tenant()
        assert api.upload(h, "bot", peft_zips["pt"]).status_code == 201
        first = api.client.post("/v1/completions", json=body, headers=h).json()["choices"][0]["text"]
        assert (api.state.prefix_store.hits, api.state.prefix_store.misses) == (0, 1)
    with running_api(settings, engine=api_engine) as api:
        again = api.client.post("/v1/completions", json=body, headers=h).json()["choices"][0]["text"]
        assert again == first
        assert (api.state.prefix_store.hits, api.state.prefix_store.misses) == (1, 0)
        m = samples(api.client.get("/metrics").text)
        assert m["promptfleet_prefix_store_hits_total"][0].value == 1

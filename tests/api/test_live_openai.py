"""The app under uvicorn on a real socket: the official ``openai`` client (plain, streamed,
models, errors), and clients that disconnect mid-generation (the engine slot is freed)."""
from __future__ import annotations

import json
import socket

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from promptfleet.api import create_app
from promptfleet.platform.sampling import SamplingParams
from promptfleet.testing.api_app import api_settings, engine_reference
from promptfleet.testing.engine_gate import StepGate
from promptfleet.testing.live_server import live_server
from promptfleet.testing.polling import wait_for


@pytest.fixture(scope="module")
def live(api_engine, small_checkpoint, tmp_path_factory, peft_zips):
    settings = api_settings(tmp_path_factory.mktemp("live"), small_checkpoint, max_tokens_limit=900,
                            max_prompt_tokens=64)
    app = create_app(settings, engine=api_engine)
    with live_server(app) as server:
        admin = {"Authorization": f"Bearer {settings.admin_key}"}
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            def tenant(name: str, **limits) -> str:
                r = http.post("/admin/tenants", json={"name": name, **limits}, headers=admin)
                assert r.status_code == 201, r.text
                return r.json()["api_key"]

            server.key = tenant("openai-user")
            server.slow_key = tenant("rate-limited", rate_per_s=0.01, rate_burst=1)
            r = http.post("/v1/adapters", data={"name": "helper"}, headers={"Authorization": f"Bearer {server.key}"},
                          files={"file": ("a.zip", peft_zips["pt"], "application/zip")})
            assert r.status_code == 201, r.text
        yield server


@pytest.fixture
def client(live) -> OpenAI:
    return OpenAI(base_url=f"{live.base_url}/v1", api_key=live.key, max_retries=0, timeout=60)


def test_openai_client_completion_equals_the_engine(client, live, peft_dirs):
    for model, adapter_dir in (("helper", peft_dirs["pt"]), ("gpt2", None)):
        out = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
        want = engine_reference(live.state.engine, "Once upon a time", SamplingParams(max_tokens=8, temperature=0),
                                adapter_dir)
        assert out.choices[0].text == want
        assert out.choices[0].finish_reason == "length" and out.model == model
        assert out.usage.completion_tokens == 8 and out.object == "text_completion"
    batch = client.completions.create(model="helper", prompt=["a", "b"], max_tokens=4, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]


def test_openai_client_streaming(client, live, peft_dirs):
    want = engine_reference(live.state.engine, "Streaming", SamplingParams(max_tokens=10, temperature=0),
                            peft_dirs["pt"])
    chunks = list(client.completions.create(model="helper", prompt="Streaming", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == want and len(texts) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10


def test_openai_client_models(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["gpt2", "helper"]
    assert client.models.retrieve("helper").owned_by == "openai-user"


def test_openai_client_errors(client, live):
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="gpt2", prompt="x", max_tokens=901)
    assert "max_tokens_limit=900" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:  # 400 naming the field, as OpenAI's own API
        client.completions.create(model="gpt2", prompt="x", temperature=5)
    assert "temperature" in exc.value.message and exc.value.body["param"] == "temperature"
    bad = OpenAI(base_url=f"{live.base_url}/v1", api_key="pf-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="gpt2", prompt="x", max_tokens=2)
    slow = OpenAI(base_url=f"{live.base_url}/v1", api_key=live.slow_key, max_retries=0)
    slow.models.list()
    with pytest.raises(openai.RateLimitError) as exc:
        slow.models.list()
    assert int(exc.value.response.headers["retry-after"]) >= 1


def test_repetition_finish_reason_passes_through_the_client(client):
    out = client.completions.create(model="gpt2", prompt="x", max_tokens=64, temperature=0,
                                    extra_body={"repetition_penalty": 0.05})
    assert out.choices[0].finish_reason == "repetition"
    chunks = list(client.completions.create(model="gpt2", prompt="x", max_tokens=64, temperature=0, stream=True,
                                            extra_body={"repetition_penalty": 0.05, "seed": 1}))
    assert chunks[-1].choices[0].finish_reason == "repetition"


def _idle(engine) -> bool:
    s = engine.stats()
    return s.running == 0 and s.waiting == 0


def _closed_requests(live) -> float:
    """How many completions this tenant closed before their answer (the 499 counter)."""
    metrics = httpx.get(f"{live.base_url}/metrics", timeout=30).text
    want = {"model": "gpt2", "status": "499", "tenant": "openai-user"}
    return sum(s.value for f in text_string_to_metric_families(metrics) for s in f.samples
               if s.name == "promptfleet_completion_requests_total" and want.items() <= s.labels.items())


def test_stream_disconnect_frees_the_engine_slot(live):
    """The engine is held after each step it is allowed, so the disconnect is seen while the
    request still runs however slow the machine: it stops after the one allowed step."""
    engine = live.state.engine
    wait_for(lambda: _idle(engine), what="the engine to be idle")
    before, closed = engine.stats().tokens_generated, _closed_requests(live)
    body = {"model": "gpt2", "prompt": "Hello", "max_tokens": 900, "temperature": 0.8, "ignore_eos": True,
            "stream": True}
    with StepGate(engine, allow=1) as gate:
        with httpx.Client(base_url=live.base_url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body,
                             headers={"Authorization": f"Bearer {live.key}"}) as r:
                assert r.status_code == 200
                first = next(r.iter_lines())
                assert first.startswith("data: ")
                gate.wait_held()
                assert engine.stats().running == 1
        wait_for(lambda: _closed_requests(live) == closed + 1, what="the server to record the closed stream")
        gate.open()
        wait_for(lambda: _idle(engine), what="the engine to free the request's slot")
    assert engine.stats().tokens_generated - before <= 2  # cancelled after the held step, not run to its end
    wait_for(lambda: live.state.limiter.active(_tenant_id(live)) == 0, what="the tenant's slot to be released")


def test_plain_request_disconnect_frees_the_engine_slot(live):
    engine = live.state.engine
    wait_for(lambda: _idle(engine), what="the engine to be idle")
    before, closed = engine.stats().tokens_generated, _closed_requests(live)
    body = json.dumps({"model": "gpt2", "prompt": "Bye", "max_tokens": 900, "temperature": 0.8,
                       "ignore_eos": True}).encode()
    port = int(live.base_url.rsplit(":", 1)[1])
    with StepGate(engine, allow=1) as gate:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {live.key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body)
            wait_for(lambda: engine.stats().running == 1 and gate.held, what="the request to run at the held engine")
        # the client is gone while its request runs: the server notices and cancels it
        wait_for(lambda: _closed_requests(live) == closed + 1, what="the server to record the closed request")
        gate.open()
        wait_for(lambda: _idle(engine), what="the engine to free the request's slot")
    assert engine.stats().tokens_generated - before <= 2


def _tenant_id(live) -> str:
    with httpx.Client(base_url=live.base_url) as http:
        rows = http.get("/admin/tenants", headers={"Authorization": "Bearer pf-admin-test-key"}).json()["data"]
    return next(t["id"] for t in rows if t["name"] == "openai-user")


def test_served_under_uvicorn_with_request_ids(live):
    r = httpx.get(f"{live.base_url}/readyz", headers={"X-Request-ID": "live-1"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == "live-1"
    assert httpx.get(f"{live.base_url}/healthz", timeout=60).json()["status"] == "ok"

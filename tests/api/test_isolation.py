"""Tenant isolation under attack, on a real socket: while tenant V streams greedy
completions through its adapter, tenant A sends completions with extreme numbers (driven by
hypothesis) and uploads hostile adapters. V's text must equal its solo run, no response may
be a 5xx, nothing A sends is stored, and the server's memory stays bounded."""
from __future__ import annotations

import io
import json
import math
import threading
import zipfile
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from promptfleet.api import create_app
from promptfleet.testing.api_app import api_settings
from promptfleet.testing.live_server import live_server

VICTIM = {"model": "v-adapter", "prompt": "Tenant V streams a long answer:", "max_tokens": 120,
          "temperature": 0, "stream": True, "ignore_eos": True}

EXTREME_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e-5, 9.99e-6, 1e-6, 2.0, 1.9999999, 0.01, 100.0, 1e308,
                     -1e-300, math.inf, -math.inf, math.nan]),
    st.floats(allow_nan=True, allow_infinity=True))
EXTREME_INTS = st.one_of(st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, -(2**63), 2**64, 10**40]), st.integers())


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def _hostile_adapter(template: Path, fill: float) -> bytes:
    """A PEFT folder (template's config and shape) whose prompt_embeddings are all ``fill``."""
    config = json.loads((template / "adapter_config.json").read_text())
    from safetensors.torch import load_file
    emb = load_file(template / "adapter_model.safetensors")["prompt_embeddings"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("adapter_config.json", json.dumps(config))
        zf.writestr("adapter_model.safetensors", save_safetensors({"prompt_embeddings": torch.full_like(emb, fill)}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(api_engine, small_checkpoint, tmp_path_factory, peft_zips):
    settings_ = api_settings(tmp_path_factory.mktemp("isolation"), small_checkpoint, max_tokens_limit=200,
                             generation_cache_enabled=False, tenant_rate_per_s=10_000.0,
                             tenant_rate_burst=10_000)
    app = create_app(settings_, engine=api_engine)
    with live_server(app) as live:
        admin = {"Authorization": f"Bearer {settings_.admin_key}"}
        with httpx.Client(base_url=live.base_url, timeout=60) as http:
            keys = {}
            for who in ("victim", "attacker"):
                r = http.post("/admin/tenants", json={"name": who}, headers=admin)
                assert r.status_code == 201, r.text
                keys[who] = {"Authorization": f"Bearer {r.json()['api_key']}"}
            r = http.post("/v1/adapters", data={"name": "v-adapter"}, headers=keys["victim"],
                          files={"file": ("a.zip", peft_zips["pt"], "application/zip")})
            assert r.status_code == 201, r.text
        live.keys = keys
        yield live


def _stream_text(http: httpx.Client, headers: dict) -> str:
    parts = []
    with http.stream("POST", "/v1/completions", json=VICTIM, headers=headers) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                parts.append(chunk["choices"][0]["text"])
    return "".join(parts)


@pytest.mark.slow
def test_attacker_cannot_touch_a_streaming_tenant(server, peft_dirs):
    with httpx.Client(base_url=server.base_url, timeout=120) as http:
        solo = _stream_text(http, server.keys["victim"])
        assert solo
        attacker = server.keys["attacker"]
        statuses: list[int] = []

        def send(body: dict | str) -> httpx.Response:
            content = body if isinstance(body, str) else json.dumps(body)  # NaN/inf go out as bare tokens
            r = http.post("/v1/completions", content=content,
                          headers={**attacker, "Content-Type": "application/json"})
            statuses.append(r.status_code)
            assert r.status_code < 500, (body, r.text)
            return r

        # warm up (adapter cache, allocator) before the memory baseline
        send({"model": "gpt2", "prompt": "warm", "max_tokens": 4, "temperature": 1e-300})
        rss0 = _rss_mib()

        victim_texts: list[str] = []
        victim_errors: list[BaseException] = []
        stop = threading.Event()

        def victim() -> None:
            with httpx.Client(base_url=server.base_url, timeout=120) as vh:
                while not stop.is_set():
                    try:
                        victim_texts.append(_stream_text(vh, server.keys["victim"]))
                    except BaseException as exc:  # reported below
                        victim_errors.append(exc)
                        return

        thread = threading.Thread(target=victim)
        thread.start()
        try:
            # the measured cases of issue 12, then hypothesis' extremes
            for body in ({"temperature": 1e-300}, {"temperature": 5e-324}, {"repetition_penalty": 1e-300},
                         {"temperature": 1e-300, "top_p": 1e-300, "repetition_penalty": 100.0, "top_k": 1}):
                send({"model": "gpt2", "prompt": "attack", "max_tokens": 8, **body})

            @settings(max_examples=40, deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(temperature=EXTREME_FLOATS, top_p=EXTREME_FLOATS, repetition_penalty=EXTREME_FLOATS,
                   top_k=EXTREME_INTS, seed=EXTREME_INTS, max_tokens=st.integers(-2, 6),
                   n=st.integers(-1, 3), model=st.sampled_from(["gpt2", "v-adapter", "gpt2@1", "x" * 300]))
            def attack(temperature, top_p, repetition_penalty, top_k, seed, max_tokens, n, model):
                send({"model": model, "prompt": "attack", "temperature": temperature, "top_p": top_p,
                      "repetition_penalty": repetition_penalty, "top_k": top_k, "seed": seed,
                      "max_tokens": max_tokens, "n": n})

            attack()
            send('{"model": "gpt2", "prompt": "x", "temperature": ' + "9" * 5000 + "}")
            send('{"model": "gpt2", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}")
            # hostile adapters: finite in float32, far past anything the backbone can carry
            for template, fill in ((peft_dirs["pt"], 3e38), (peft_dirs["prefix"], 3e38),
                                   (peft_dirs["pt"], 1e6), (peft_dirs["prefix"], -1e7)):
                r = http.post("/v1/adapters", data={"name": "evil"}, headers=attacker,
                              files={"file": ("a.zip", _hostile_adapter(template, fill), "application/zip")})
                statuses.append(r.status_code)
                assert r.status_code == 400, r.text
                assert r.json()["error"]["code"] == "adapter_rejected"
                assert "prompt_embeddings" in r.json()["error"]["message"]
        finally:
            stop.set()
            thread.join(timeout=300)
        assert not victim_errors, victim_errors
        assert victim_texts and all(t == solo for t in victim_texts), (solo, victim_texts)
        assert http.get("/v1/adapters", headers=attacker).json()["data"] == []
        assert 200 in statuses and 400 in statuses
        grown = _rss_mib() - rss0
        assert grown < 200, f"server memory grew by {grown:.0f} MiB"
    assert server.state.engine.stats().running == 0

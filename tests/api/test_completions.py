"""``POST /v1/completions`` through the ASGI app: prompt forms, sampling parameters,
streaming, and every 400 the endpoint gives. Outputs are compared with the engine's
own answer to the same request."""
from __future__ import annotations

import json

import pytest

from promptfleet.platform.sampling import SamplingParams
from promptfleet.testing import api_error
from promptfleet.testing.api_app import engine_reference

GREEDY = {"model": "gpt2", "max_tokens": 8, "temperature": 0}


def _err(r, status: int, code: str | None = None) -> dict:
    return api_error(r, status, code, type="invalid_request_error")


def sse_events(text: str) -> list:
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture
def tenant(api):
    return api.new_tenant()[1]


def test_string_prompt_matches_the_engine(api, tenant):
    r = api.client.post("/v1/completions", json={**GREEDY, "prompt": "The quick brown fox"}, headers=tenant)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "gpt2"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] == "length"
    assert choice["text"] == engine_reference(api.engine, "The quick brown fox", SamplingParams(max_tokens=8,
                                                                                                temperature=0))
    n_prompt = len(api.engine.encode("The quick brown fox"))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 8, "total_tokens": n_prompt + 8}


def test_every_prompt_form(api, tenant):
    enc = api.engine.encode
    greedy = SamplingParams(max_tokens=8, temperature=0)
    prompts = ["Hello", "Once upon a time", "x"]
    refs = [engine_reference(api.engine, p, greedy) for p in prompts]
    for prompt in (prompts, [enc(p) for p in prompts]):
        r = api.client.post("/v1/completions", json={**GREEDY, "prompt": prompt}, headers=tenant)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2]
        assert [c["text"] for c in choices] == refs
        assert r.json()["usage"]["prompt_tokens"] == sum(len(enc(p)) for p in prompts)
    r = api.client.post("/v1/completions", json={**GREEDY, "prompt": enc("Hello")}, headers=tenant)
    assert [c["text"] for c in r.json()["choices"]] == refs[:1]
    # the empty prompt is the end-of-text token, as in GPT-2
    r = api.client.post("/v1/completions", json={**GREEDY, "prompt": ""}, headers=tenant)
    assert r.json()["choices"][0]["text"] == engine_reference(api.engine, [50256], greedy)


def test_sampling_parameters_reach_the_engine(api, tenant):
    eng = api.engine
    # seeded sampling: reproducible, and sample j of n uses seed + j
    req = {"model": "gpt2", "prompt": "Hello", "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "top_k": 50,
           "seed": 1234, "n": 2}
    a = api.client.post("/v1/completions", json=req, headers=tenant).json()
    assert [c["index"] for c in a["choices"]] == [0, 1]
    n_hello = len(eng.encode("Hello"))
    assert a["usage"]["prompt_tokens"] == n_hello and a["usage"]["completion_tokens"] == 16  # the prompt once
    twice = api.client.post("/v1/completions", json={**req, "n": 1, "prompt": ["Hello", "Hello"]}, headers=tenant)
    assert twice.json()["usage"]["prompt_tokens"] == 2 * n_hello
    for j, choice in enumerate(a["choices"]):
        assert choice["text"] == engine_reference(eng, "Hello", SamplingParams(
            max_tokens=8, temperature=0.9, top_p=0.9, top_k=50, seed=1234 + j))
    # repetition_penalty and a stop string
    full = engine_reference(eng, "abc", SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.3))
    r = api.client.post("/v1/completions", headers=tenant, json={
        "model": "gpt2", "prompt": "abc", "max_tokens": 16, "temperature": 0, "repetition_penalty": 1.3})
    assert r.json()["choices"][0]["text"] == full
    stop = full[len(full) // 2: len(full) // 2 + 3]
    r = api.client.post("/v1/completions", headers=tenant, json={
        "model": "gpt2", "prompt": "abc", "max_tokens": 16, "temperature": 0, "repetition_penalty": 1.3,
        "stop": [stop, "@@never@@"]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == full[: full.index(stop)]


def test_repetition_finish_reason(api, tenant):
    r = api.client.post("/v1/completions", headers=tenant, json={
        "model": "gpt2", "prompt": "x", "max_tokens": 64, "temperature": 0, "repetition_penalty": 0.05})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "repetition" and r.json()["usage"]["completion_tokens"] < 64


def test_streaming(api, tenant):
    want = engine_reference(api.engine, "Hello", SamplingParams(max_tokens=8, temperature=0.7, seed=5))
    r = api.client.post("/v1/completions", headers=tenant, json={
        "model": "gpt2", "prompt": "Hello", "max_tokens": 8, "temperature": 0.7, "seed": 5, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    chunks = events[:-1]
    assert len(chunks) >= 2
    for c in chunks:
        assert c["object"] == "text_completion" and c["id"] == chunks[0]["id"] and c["model"] == "gpt2"
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 and c["choices"][0]["logprobs"] is None
        assert "usage" not in c
    assert "".join(c["choices"][0]["text"] for c in chunks) == want
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

    # several prompts interleave; include_usage adds a final usage chunk
    r = api.client.post("/v1/completions", headers=tenant, json={
        **GREEDY, "prompt": ["Hello", "abc"], "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    *chunks, usage_chunk, done = events
    assert done == "[DONE]" and usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 16
    assert all(c["usage"] is None for c in chunks)
    for i, prompt in enumerate(["Hello", "abc"]):
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == i)
        assert text == engine_reference(api.engine, prompt, SamplingParams(max_tokens=8, temperature=0))


@pytest.mark.parametrize("extra, param", [
    ({"echo": True}, "echo"), ({"logprobs": 2}, "logprobs"), ({"suffix": "end"}, "suffix"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"), ({"best_of": 3}, "best_of")])
def test_unsupported_parameters_are_400(api, tenant, extra, param):
    err = _err(api.client.post("/v1/completions", json={**GREEDY, "prompt": "x", **extra}, headers=tenant), 400,
               "unsupported_parameter")
    assert param in err["message"] and err["param"] == param


def test_harmless_openai_parameters_are_accepted(api, tenant):
    r = api.client.post("/v1/completions", headers=tenant, json={
        **GREEDY, "prompt": "x", "echo": False, "logprobs": None, "best_of": 1, "frequency_penalty": 0,
        "presence_penalty": 0, "user": "someone", "logit_bias": {}, "n": 1, "stop": None, "top_k": -1})
    assert r.status_code == 200, r.text


def test_limits_are_400_naming_the_limit(api, tenant):
    err = _err(api.client.post("/v1/completions", json={**GREEDY, "prompt": "x", "max_tokens": 65},
                               headers=tenant), 400, "max_tokens_too_large")
    assert "max_tokens_limit=64" in err["message"]
    err = _err(api.client.post("/v1/completions", json={**GREEDY, "prompt": [1] * 257}, headers=tenant), 400,
               "prompt_too_long")
    assert "max_prompt_tokens=256" in err["message"] and "257 tokens" in err["message"]
    err = _err(api.client.post("/v1/completions", json={**GREEDY, "prompt": ["a", "b", [1] * 300][:2] + ["z" * 2000]},
                               headers=tenant), 400, "prompt_too_long")
    assert err["message"].startswith("prompt 2 has")
    err = _err(api.client.post("/v1/completions", json={**GREEDY, "prompt": [1, 60000]}, headers=tenant), 400,
               "invalid_token_id")
    assert "60000" in err["message"]
    err = _err(api.client.post("/v1/completions", json={**GREEDY, "prompt": ["a"] * 9, "n": 8}, headers=tenant),
               400, "too_many_choices")


def test_context_length_is_400(make_api):
    api = make_api(max_prompt_tokens=4096, max_tokens_limit=4096)
    _, h = api.new_tenant()
    r = api.client.post("/v1/completions", json={**GREEDY, "prompt": [1] * 1000, "max_tokens": 24}, headers=h)
    assert r.status_code == 200, r.text
    err = _err(api.client.post("/v1/completions", json={**GREEDY, "prompt": [1] * 1000, "max_tokens": 25},
                               headers=h), 400, "context_length_exceeded")
    assert "context is 1024 tokens" in err["message"] and "1025" in err["message"]
    err = _err(api.client.post("/v1/completions", json={**GREEDY, "prompt": [1] * 1024}, headers=h), 400,
               "context_length_exceeded")


@pytest.mark.parametrize("body, where", [
    ({"prompt": "x"}, "body.model"), ({"model": "gpt2"}, "body.prompt"),
    ({"model": "gpt2", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "gpt2", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "gpt2", "prompt": "x", "repetition_penalty": 1e-300}, "repetition_penalty"),
    ({"model": "gpt2", "prompt": "x", "repetition_penalty": 0.001}, "repetition_penalty"),
    ({"model": "gpt2", "prompt": "x", "temperature": -1e-300}, "temperature"),
    ({"model": "gpt2", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "gpt2", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "gpt2", "prompt": "x", "stop": ""}, "stop"),
    ({"model": "gpt2", "prompt": []}, "prompt"),
    ({"model": "gpt2", "prompt": [True, 2]}, "prompt"),
    ({"model": "gpt2", "prompt": [[1], []]}, "prompt"),
    ({"model": "gpt2", "prompt": "x", "n": 0}, "n"),
    ({"model": "gpt2", "prompt": "x", "stream": "yes"}, "stream"),
    ({"model": "gpt2", "prompt": "x", "bogus": 1}, "bogus"),
    ({"model": "gpt2", "prompt": "x", "stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
])
def test_schema_violations_are_400_in_openai_shape(api, tenant, body, where):
    err = _err(api.client.post("/v1/completions", json=body, headers=tenant), 400, "invalid_parameters")
    assert where in err["message"]


def test_unknown_model_is_404_model_not_found(api, tenant):
    for model in ("nope", "nope@2", "bad name!", "gpt2@1"):
        err = _err(api.client.post("/v1/completions", json={**GREEDY, "model": model, "prompt": "x"},
                                   headers=tenant), 404, "model_not_found")
        assert err["param"] == "model"

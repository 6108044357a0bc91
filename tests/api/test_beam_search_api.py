"""Beam search through ``/v1/completions``: the official openai client's ``best_of`` with
the ``use_beam_search`` extension returns transformers' best beams (PEFT's, for an
adapter), an adapter's ``num_beams`` default serves the requests that leave decoding to
it, repeats come from the generation cache, and every misuse is a 400 that says why."""
from __future__ import annotations

import pytest
from openai import OpenAI

from promptfleet.platform.beam_search import BeamParams
from promptfleet.platform.sampling import SamplingParams
from promptfleet.testing import api_error
from promptfleet.testing.api_app import engine_reference
from promptfleet.testing.peft import load_reference_model, reference_beams

PROMPT = "Once upon a time"


def _client(api, headers) -> OpenAI:
    # the official client over the test app's own transport (TestClient is an httpx.Client)
    return OpenAI(base_url=f"{api.client.base_url}/v1", api_key=headers["Authorization"].split()[1], max_retries=0,
                  http_client=api.client)


def _reference(api, checkpoint, adapter_dir, *, k: int, n: int, max_tokens: int, **scoring) -> list[tuple[str, str]]:
    """transformers' (PEFT's) beams as ``(text, finish_reason)``."""
    model = load_reference_model(checkpoint, adapter_dir)
    beams = reference_beams(model, api.engine.encode(PROMPT), num_beams=k, num_return=n, max_new_tokens=max_tokens,
                            eos_token_ids=list(api.engine.model_config.eos_token_ids), **scoring)
    decode = api.engine.tokenizer.decode
    return [(decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), "stop" if ended else "length")
            for ids, ended in beams]


@pytest.mark.parametrize("model", ["gpt2", "pt"])
def test_openai_client_best_of_with_beam_search_equals_transformers(api, small_checkpoint, peft_zips, peft_dirs,
                                                                    model, monkeypatch):
    _, h = api.new_tenant("beams")
    assert api.upload(h, "pt", peft_zips["pt"]).status_code == 201
    adapter_dir = None if model == "gpt2" else peft_dirs["pt"]
    client = _client(api, h)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, n=2, best_of=4,
                                    extra_body={"use_beam_search": True})
    want = _reference(api, small_checkpoint, adapter_dir, k=4, n=2, max_tokens=8)
    assert [(c.index, c.text, c.finish_reason) for c in out.choices] == [(i, t, f) for i, (t, f) in enumerate(want)]
    assert out.usage.completion_tokens == 16
    # transformers' scoring options reach the engine's search (whose scoring the engine
    # tests check against transformers with beams of different lengths)
    searches, search = [], api.engine.beam_search

    def spy(prompt, params, beam, adapter=None):
        searches.append(beam)
        return search(prompt, params, beam, adapter)

    monkeypatch.setattr(api.engine, "beam_search", spy)
    out = client.completions.create(model=model, prompt=[PROMPT, PROMPT], max_tokens=6, n=3,
                                    extra_body={"use_beam_search": True, "length_penalty": 0.0,
                                                "early_stopping": "never"})
    want = _reference(api, small_checkpoint, adapter_dir, k=3, n=3, max_tokens=6, length_penalty=0.0,
                      early_stopping="never")
    assert [c.text for c in out.choices] == [t for t, _ in want] * 2
    assert [c.index for c in out.choices] == list(range(6))
    assert searches == [BeamParams(3, 3, length_penalty=0.0, early_stopping="never")] * 2


def test_a_repeated_search_is_answered_from_the_generation_cache(api):
    _, h = api.new_tenant("cache")
    body = {"model": "gpt2", "prompt": PROMPT, "max_tokens": 6, "n": 2, "best_of": 3, "use_beam_search": True}
    first = api.client.post("/v1/completions", json=body, headers=h)
    hits = api.state.gen_cache.hits
    again = api.client.post("/v1/completions", json=body, headers=h)
    assert first.status_code == again.status_code == 200, again.text
    assert api.state.gen_cache.hits == hits + 2
    assert [c["text"] for c in first.json()["choices"]] == [c["text"] for c in again.json()["choices"]]
    # other scoring is another search
    other = api.client.post("/v1/completions", json={**body, "length_penalty": -2.0}, headers=h)
    assert other.status_code == 200 and api.state.gen_cache.hits == hits + 2


@pytest.mark.parametrize("extra, code, param, words", [
    ({"stream": True}, "beam_search_not_streamable", "stream", "cannot be streamed"),
    ({"temperature": 0.7}, "invalid_beam_search", "temperature", "deterministic"),
    ({"top_p": 0.5}, "invalid_beam_search", "top_p", "deterministic"),
    ({"best_of": 1}, "invalid_beam_search", "best_of", "at least 2 beams"),
    ({"best_of": 9}, "invalid_beam_search", "best_of", "max_beam_width=8"),
    ({"best_of": 2, "n": 3}, "invalid_best_of", "best_of", "at least n"),
])
def test_misused_beam_search_is_400(api, extra, code, param, words):
    _, h = api.new_tenant("misuse")
    body = {"model": "gpt2", "prompt": PROMPT, "max_tokens": 4, "best_of": 2, "use_beam_search": True, **extra}
    err = api_error(api.client.post("/v1/completions", json=body, headers=h), 400, code)
    assert err["param"] == param and words in err["message"], err


def test_beams_cannot_take_more_of_the_batch_than_a_sampled_request(api):
    """prompts x beams is bounded like prompts x n (64), and a width the engine cannot run
    at once (this engine: 16 rows) is refused before anything is queued."""
    _, h = api.new_tenant("rows")
    body = {"model": "gpt2", "max_tokens": 2, "use_beam_search": True, "best_of": 8}
    err = api_error(api.client.post("/v1/completions", json={**body, "prompt": ["a"] * 9}, headers=h), 400,
                    "too_many_choices")
    assert "9 prompts x 8 beams" in err["message"]
    assert api.client.post("/v1/completions", json={**body, "prompt": ["a"] * 8}, headers=h).status_code == 200
    small = api.engine.scheduler.max_batch_size
    api.state.settings.max_beam_width = 64  # past the engine's rows
    try:
        err = api_error(api.client.post("/v1/completions", json={**body, "prompt": "a", "best_of": small + 1},
                                        headers=h), 400, "invalid_beam_search")
    finally:
        api.state.settings.max_beam_width = 8
    assert f"runs at once ({small} sequences)" in err["message"]


def test_best_of_above_n_without_beam_search_is_refused_saying_what_to_do(api):
    _, h = api.new_tenant("sampled")
    err = api_error(api.client.post("/v1/completions", json={"model": "gpt2", "prompt": PROMPT, "best_of": 3},
                                    headers=h), 400, "unsupported_parameter")
    assert "use_beam_search=true" in err["message"]
    ok = api.client.post("/v1/completions", json={"model": "gpt2", "prompt": PROMPT, "max_tokens": 3, "best_of": 2,
                                                  "use_beam_search": True, "temperature": 0}, headers=h)
    assert ok.status_code == 200, ok.text


def test_adapter_num_beams_default_serves_requests_that_leave_decoding_to_it(api, small_checkpoint, peft_zips,
                                                                            peft_dirs):
    _, h = api.new_tenant("defaults")
    assert api.upload(h, "clf", peft_zips["pt"]).status_code == 201
    r = api.client.patch("/v1/adapters/clf", headers=h, json={"generation_defaults": {
        "num_beams": 3, "max_tokens": 6, "length_penalty": 0.0}})
    assert r.status_code == 200, r.text
    assert r.json()["generation_defaults"] == {"num_beams": 3, "max_tokens": 6, "length_penalty": 0.0}
    client = _client(api, h)
    out = client.completions.create(model="clf", prompt=PROMPT)  # nothing but the prompt: the adapter's beams
    [(text, finish)] = _reference(api, small_checkpoint, peft_dirs["pt"], k=3, n=1, max_tokens=6, length_penalty=0.0)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (text, finish)
    # a request that chooses its own decoding, or streams, is not turned into a beam search
    greedy = client.completions.create(model="clf", prompt=PROMPT, temperature=0)
    assert greedy.choices[0].text == engine_reference(api.engine, PROMPT, SamplingParams(max_tokens=6, temperature=0),
                                                      peft_dirs["pt"])
    chunks = list(client.completions.create(model="clf", prompt=PROMPT, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == greedy.choices[0].text
    sampled = client.completions.create(model="clf", prompt=PROMPT, stream=True, seed=3)
    assert list(sampled)  # streams (sampled at the server's temperature), no 400

"""Per-adapter decoding defaults through the API: set by PATCH or uploaded as transformers'
``generation_config.json`` beside the adapter; a request naming that version takes them for
the fields it leaves unset (explicit fields win; other versions and the base model keep the
server's), checked against the engine's own answer with the same settings and through the
official openai client, on SQLite and PostgreSQL."""
from __future__ import annotations

import asyncio
import io
import zipfile

import httpx
from openai import OpenAI
from transformers import GenerationConfig

from promptfleet.api import create_app
from promptfleet.platform.adapter import load_adapter_dir
from promptfleet.platform.beam_search import BeamParams
from promptfleet.platform.sampling import SamplingParams
from promptfleet.testing import api_error
from promptfleet.testing.api_app import ADMIN_KEY, api_settings, engine_reference
from promptfleet.testing.live_server import live_server

PROMPT = "Once upon a time"


def _complete(api, headers, **body) -> dict:
    r = api.client.post("/v1/completions", json={"prompt": PROMPT, **body}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _want(api, adapter_dir, **params) -> str:
    return engine_reference(api.engine, PROMPT, SamplingParams(**params), adapter_dir)


def test_patched_defaults_fill_only_the_unset_fields(make_api, db_kind, peft_zips, peft_dirs):
    api = make_api(db_kind)
    _, h = api.new_tenant("defaults")
    assert api.upload(h, "clf", peft_zips["pt"]).status_code == 201
    r = api.client.patch("/v1/adapters/clf", json={"generation_defaults": {"temperature": 0, "max_tokens": 5}},
                         headers=h)
    assert r.status_code == 200, r.text
    assert r.json()["generation_defaults"] == {"temperature": 0.0, "max_tokens": 5} == \
        api.client.get("/v1/adapters/clf@1", headers=h).json()["generation_defaults"]
    got = _complete(api, h, model="clf")  # no sampling field: the adapter's greedy, 5 tokens
    assert got["choices"][0]["text"] == _want(api, peft_dirs["pt"], max_tokens=5, temperature=0)
    assert got["usage"]["completion_tokens"] == 5
    got = _complete(api, h, model="clf@1", max_tokens=3, temperature=None)  # explicit wins; null is unset
    assert got["choices"][0]["text"] == _want(api, peft_dirs["pt"], max_tokens=3, temperature=0)
    # the base model and a new version without defaults keep the server's (16 tokens)
    assert _complete(api, h, model="gpt2", temperature=0)["choices"][0]["text"] == \
        _want(api, None, max_tokens=16, temperature=0)
    assert api.upload(h, "clf", peft_zips["pt"]).status_code == 201
    assert api.client.get("/v1/adapters/clf", headers=h).json()["generation_defaults"] is None
    assert _complete(api, h, model="clf", temperature=0)["usage"]["completion_tokens"] == 16
    # cleared with null
    r = api.client.patch("/v1/adapters/clf@1", json={"generation_defaults": None}, headers=h)
    assert r.status_code == 200 and r.json()["generation_defaults"] is None


def test_bad_defaults_and_other_tenants_are_refused_and_change_nothing(make_api, peft_zips):
    api = make_api()
    _, h = api.new_tenant("owner")
    _, other = api.new_tenant("other")
    assert api.upload(h, "clf", peft_zips["pt"]).status_code == 201
    for body in ({"generation_defaults": {"temperature": 5}}, {"generation_defaults": {"num_beams": 17}},
                 {"generation_defaults": {"temperature": "0"}}, {"defaults": {}}):
        r = api.client.patch("/v1/adapters/clf", json=body, headers=h)
        assert r.status_code in (400, 422), r.text
        assert "error" in r.json() and r.json()["error"]["message"], r.text
    api_error(api.client.patch("/v1/adapters/clf", json={"generation_defaults": {"temperature": 0}}, headers=other),
              404, "adapter_not_found")
    assert api.client.get("/v1/adapters/clf", headers=h).json()["generation_defaults"] is None


def _with_generation_config(archive: bytes, config: bytes) -> bytes:
    src, out = zipfile.ZipFile(io.BytesIO(archive)), io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for info in src.infolist():
            zf.writestr(info, src.read(info))
        zf.writestr("generation_config.json", config)
    return out.getvalue()


def test_uploaded_generation_config_is_served_to_the_openai_client(api_engine, small_checkpoint, peft_zips,
                                                                   peft_dirs, tmp_path):
    GenerationConfig(max_new_tokens=6, repetition_penalty=1.3).save_pretrained(tmp_path)  # greedy: no do_sample
    config = (tmp_path / "generation_config.json").read_bytes()
    GenerationConfig(num_beams=4).save_pretrained(tmp_path / "beams")
    beams = (tmp_path / "beams" / "generation_config.json").read_bytes()
    settings = api_settings(tmp_path / "data", small_checkpoint)
    with live_server(create_app(settings, engine=api_engine)) as server, \
            httpx.Client(base_url=server.base_url, timeout=60) as http:
        r = http.post("/admin/tenants", json={"name": "upload"}, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        key = r.json()["api_key"]
        h = {"Authorization": f"Bearer {key}"}

        def upload(name: str, archive: bytes) -> httpx.Response:
            return http.post("/v1/adapters", data={"name": name}, headers=h,
                             files={"file": ("a.zip", archive, "application/zip")})

        r = upload("tuned", _with_generation_config(peft_zips["pt"], config))
        assert r.status_code == 201, r.text
        assert r.json()["generation_defaults"] == {"temperature": 0.0, "max_tokens": 6, "repetition_penalty": 1.3}
        r = upload("beams", _with_generation_config(peft_zips["pt"], beams))
        assert r.status_code == 201, r.text
        assert r.json()["generation_defaults"] == {"num_beams": 4}
        sampling = GenerationConfig(num_beams=4, do_sample=True)
        sampling.save_pretrained(tmp_path / "beam-sampling")
        refused = api_error(upload("sampled", _with_generation_config(
            peft_zips["pt"], (tmp_path / "beam-sampling" / "generation_config.json").read_bytes())), 400,
            "adapter_rejected")
        assert "beam sampling" in refused["message"]
        assert http.get("/v1/adapters/sampled", headers=h).status_code == 404
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key=key, max_retries=0, timeout=60)
        out = client.completions.create(model="tuned", prompt=PROMPT)  # the openai client sends no defaults
        searched = client.completions.create(model="beams", prompt=PROMPT, max_tokens=5)
    want = engine_reference(api_engine, PROMPT, SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1.3),
                            peft_dirs["pt"])
    assert out.choices[0].text == want and out.usage.completion_tokens == 6
    [best] = asyncio.run(api_engine.beam_search(PROMPT, SamplingParams(max_tokens=5), BeamParams(4),
                                                api_engine.build_adapter(load_adapter_dir(peft_dirs["pt"]), "ref")))
    assert searched.choices[0].text == best.text  # the engine's beams (tested against PEFT's in the engine tests)


def _learnable(n: int, seed: int) -> bytes:
    import json
    import random

    words = ["apple", "river", "stone", "cloud", "seven", "green", "table", "north"]
    rng = random.Random(seed)
    return "".join(json.dumps({"prompt": " ".join(rng.sample(words, 3)) + ":", "completion": " the fleet sails"})
                   + "\n" for _ in range(n)).encode()


def test_a_trained_version_is_served_with_the_defaults_its_job_tuned(make_api, tmp_path):
    """A job with validation data picks decoding defaults on it; the version it registers
    carries them, and a request with no sampling field (the openai client's way) gets them."""
    import time

    api = make_api(embedded_worker=True, job_heartbeat_s=0.2)
    _, h = api.new_tenant("tuned")
    ids = [api.client.post("/v1/datasets", files={"file": (f"{n}.jsonl", _learnable(n, seed), "application/jsonl")},
                           headers=h).json()["id"] for n, seed in ((16, 0), (12, 1))]
    r = api.client.post("/v1/jobs", headers=h, json={
        "adapter_name": "fleet", "dataset_id": ids[0], "validation_dataset_id": ids[1], "epochs": 10,
        "batch_size": 4, "num_virtual_tokens": 8, "learning_rate": 0.1, "seed": 4})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 240  # the first job waits for the niced trainer's one-time imports
    while (job := api.client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    decoding = job["metrics"]["decoding"]
    assert [t["name"] for t in decoding["tried"]][0] == "greedy" and decoding["tried"][0]["accuracy"] >= 0.5
    version = api.client.get("/v1/adapters/fleet", headers=h).json()
    assert version["generation_defaults"] == decoding["best"]
    assert decoding["best"]["temperature"] == 0.0 and decoding["best"]["stop"] == ["\n"]
    archive = api.client.get("/v1/adapters/fleet/download", headers=h).content
    adapter_dir = tmp_path / "fleet"
    zipfile.ZipFile(io.BytesIO(archive)).extractall(adapter_dir)
    best = decoding["best"]
    want = engine_reference(api.engine, "apple river stone:", SamplingParams(
        max_tokens=best["max_tokens"], temperature=0.0, stop=tuple(best["stop"]),
        repetition_penalty=best.get("repetition_penalty", 1.0)), adapter_dir)
    # the official client, over the test app's own transport (TestClient is an httpx.Client)
    client = OpenAI(base_url=f"{api.client.base_url}/v1", api_key=h["Authorization"].split()[1], max_retries=0,
                    http_client=api.client)
    out = client.completions.create(model="fleet", prompt="apple river stone:")
    assert out.choices[0].text == want and want.strip() == "the fleet sails"

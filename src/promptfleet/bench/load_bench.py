"""Load test of a running PromptFleet server: many concurrent clients, correctness checked.

    python scripts/load_test.py                                  # self-contained: own server, tiny checkpoint
    python scripts/load_test.py --shape gpt2 --clients 200 --duration 60
    python scripts/load_test.py --url http://127.0.0.1:8000 --admin-key KEY --model CKPT --server-pid PID

(also ``python -m promptfleet.bench.load_bench``). Self-contained mode writes a seeded random
checkpoint of ``--shape`` (or takes ``--model``) and starts ``promptfleet serve`` as a
subprocess (SQLite by default, or ``--database-url``) with the generation cache OFF, so
every request reaches the engine. With ``--url`` it drives a server you started: give it
the same checkpoint as ``--model`` (for the reference) and its ``--server-pid`` (for memory);
turn that server's generation cache off (``PROMPTFLEET_GENERATION_CACHE_ENABLED=false``)
to load the engine rather than the cache.

The run: ``--tenants`` tenants (created through the admin API with limits high enough not
to throttle), ``--adapters`` PEFT adapters (PROMPT_TUNING and PREFIX_TUNING alternately,
seeded random weights, uploaded as zips of PEFT folders) spread over the tenants; then
``--clients`` concurrent clients, each sending requests back to back for ``--duration``
seconds: greedy, ``--max-tokens`` tokens, a tenant's adapter or the base model, one of
``--prompts`` prompts, streamed (SSE) or not (``--stream-ratio``).

Checked, and reported in ONE JSON line on stdout:
  * no 5xx, no other error status, no transport error;
  * no lost or duplicated response: one record per request sent, each answer echoes its
    request's ``X-Request-ID``, completion ids are unique, a non-streamed answer has one
    choice with a finish_reason, a stream has exactly one ``[DONE]`` (last), exactly one
    finish_reason, one usage chunk and no error event; the server's own per-tenant count
    of completed requests equals the client's;
  * every greedy answer equals the reference: each distinct (adapter, prompt) run ONCE,
    alone, through a direct ``Engine`` on the same checkpoint with the same adapter
    weights (the engine's mixed-batch parity with PEFT is tested in tests/platform);
  * memory steady: the server's VmRSS (``/proc/<pid>/status``) before the load, after a
    warm-up (``--warmup`` s of the same load) and at the end; growth = end - warm-up;
  * latency p50/p99 (whole request; time to first token for streams) and throughput.
Exit status 0 when every check passes, 1 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

log = logging.getLogger("promptfleet.bench.load")

PROMPTS = ["The weather today", "Once upon a time", "def main():", "Dear customer,", "In 1905 Einstein",
           "Breaking news:", "The recipe calls for", "Q: What is the capital of", "Hello world", "My order"]
RSS_GROWTH_LIMIT_MB = 64.0      # "steady": at most this much ...
RSS_GROWTH_LIMIT_RATIO = 0.10   # ... or this fraction of the warm RSS, whichever is larger


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Load test a PromptFleet server: concurrent clients, checked answers.")
    p.add_argument("--url", help="a running server (default: start one, self-contained)")
    p.add_argument("--admin-key", default=os.environ.get("PROMPTFLEET_ADMIN_KEY"),
                   help="the server's admin key (--url mode; env PROMPTFLEET_ADMIN_KEY)")
    p.add_argument("--server-pid", type=int, help="the server's pid, for RSS (--url mode; same machine)")
    p.add_argument("--model", help="checkpoint directory (the server's, for the reference); default: a seeded "
                                   "random checkpoint of --shape")
    p.add_argument("--shape", default="tiny", help="random checkpoint shape: tiny, small-test, gpt2, ...")
    p.add_argument("--scale", type=float, default=6.0,
                   help="random weights scale (clear greedy winners; random weights at scale 1 give near-ties)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--database-url", help="self-contained mode: the server's database (default SQLite)")
    p.add_argument("--device", default="cpu", help="the reference engine's device (and the own server's)")
    p.add_argument("--dtype", default=None, help="the reference engine's dtype (and the own server's)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (after the warm-up)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of warm-up load (default min(5, duration/6))")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--adapters", type=int, default=20)
    p.add_argument("--tenants", type=int, default=2)
    p.add_argument("--prompts", type=int, default=6, help=f"distinct prompts (at most {len(PROMPTS)})")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stream-ratio", type=float, default=0.5)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--server-log-level", default="WARNING", help="self-contained mode: the server's log level")
    p.add_argument("--keep", type=Path, help="self-contained mode: keep the data dir and server log here")
    args = p.parse_args(argv)
    if args.url and not args.admin_key:
        p.error("--url needs --admin-key (or PROMPTFLEET_ADMIN_KEY)")
    if args.url and not args.model:
        p.error("--url needs --model: the server's checkpoint, for the reference answers")
    if not 1 <= args.prompts <= len(PROMPTS):
        p.error(f"--prompts must be in 1..{len(PROMPTS)}")
    if args.tenants < 1 or args.adapters < 0 or args.clients < 1:
        p.error("--tenants and --clients must be >= 1, --adapters >= 0")
    return args


# --------------------------------------------------------------------------- measurements
def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


# --------------------------------------------------------------------------- adapters
@dataclass(frozen=True)
class AdapterSpec:
    name: str
    tenant: int
    peft_type: str
    archive: bytes
    config: dict
    embeddings: object  # torch.Tensor


def make_adapters(model_config, n: int, tenants: int, seed: int) -> list[AdapterSpec]:
    """Seeded random PEFT adapters in PEFT's on-disk format (what ``save_pretrained`` writes)."""
    import torch
    from safetensors.torch import save as save_safetensors

    from promptfleet.adapters.archive import write_adapter_zip

    out = []
    for j in range(n):
        peft_type = "PROMPT_TUNING" if j % 2 == 0 else "PREFIX_TUNING"
        n_virtual = 4 + j % 5
        dim = model_config.n_embd if peft_type == "PROMPT_TUNING" else model_config.n_layer * 2 * model_config.n_embd
        gen = torch.Generator().manual_seed(seed * 1000 + j)
        emb = (torch.randn(n_virtual, dim, generator=gen) * (0.5 if peft_type == "PROMPT_TUNING" else 1.0)).contiguous()
        config = {"peft_type": peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": n_virtual,
                  "token_dim": model_config.n_embd, "num_layers": model_config.n_layer,
                  "num_attention_heads": model_config.n_head, "num_transformer_submodules": 1,
                  "base_model_name_or_path": None, "inference_mode": True}
        if peft_type == "PREFIX_TUNING":
            config.update({"prefix_projection": False, "encoder_hidden_size": model_config.n_embd})
        archive = write_adapter_zip(config, save_safetensors({"prompt_embeddings": emb}))
        out.append(AdapterSpec(f"load-{j:02d}", j % tenants, peft_type, archive, config, emb))
    return out


# --------------------------------------------------------------------------- reference
def compute_references(model_path: str, adapters: list[AdapterSpec], prompts: list[str], max_tokens: int, *,
                       device: str, dtype: str | None) -> tuple[dict[tuple[str | None, str], tuple[str, str]], float]:
    """``{(adapter name or None, prompt): (text, finish_reason)}``: each request alone
    through a direct ``Engine`` (its own process, not the server's)."""
    from promptfleet.platform.adapter import parse_adapter
    from promptfleet.platform.config import EngineConfig
    from promptfleet.platform.engine import Engine
    from promptfleet.platform.sampling import SamplingParams

    t0 = time.perf_counter()
    engine = Engine.from_pretrained(model_path, EngineConfig(device=device, dtype=dtype, max_batch_size=1))
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        prefixes = {None: None}
        for a in adapters:
            prefixes[a.name] = engine.build_adapter(parse_adapter(a.config, {"prompt_embeddings": a.embeddings}),
                                                    f"ref-{a.name}")

        async def run_all() -> dict:
            out = {}
            for name, prefix in prefixes.items():
                for prompt in prompts:
                    done = await engine.complete(prompt, params, prefix)
                    out[(name, prompt)] = (done.text, done.finish_reason)
            return out

        refs = asyncio.run(run_all())
    finally:
        engine.stop()
    return refs, time.perf_counter() - t0


# --------------------------------------------------------------------------- the server (self-contained)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnServer:
    """``promptfleet serve`` in its own process group, generation cache off."""

    def __init__(self, args: argparse.Namespace, model: str, root: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_key = f"pf-load-admin-{uuid.uuid4().hex}"
        self.log_path = root / "server.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTFLEET_")}
        env.update({"PROMPTFLEET_DATA_DIR": str(root / "data"), "PROMPTFLEET_ADMIN_KEY": self.admin_key,
                    "PROMPTFLEET_MODEL_ID": "gpt2", "PROMPTFLEET_GENERATION_CACHE_ENABLED": "false",
                    "PROMPTFLEET_MAX_QUEUE": str(max(512, 4 * args.clients)),
                    "PROMPTFLEET_LOG_LEVEL": args.server_log_level, "PYTHONUNBUFFERED": "1"})
        if args.database_url:
            env["PROMPTFLEET_DATABASE_URL"] = args.database_url
        cmd = [sys.executable, "-m", "promptfleet.cli", "serve", "--model", model, "--port", str(self.port),
               "--no-embedded-worker", "--device", args.device]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file = root / "server.pid"  # for whoever must clean up after a kill -9 of this script
        self.pid_file.write_text(f"{self.proc.pid}\n")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); log: {self.log_path}\n"
                                   f"{self.log_path.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server was not ready after {timeout:.0f} s; log: {self.log_path}")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        if self.proc.poll() is not None:
            self.pid_file.unlink(missing_ok=True)
        self._log.close()


def wait_ready(base_url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{base_url} is not ready (GET /readyz) after {timeout:.0f} s")
        time.sleep(0.5)


# --------------------------------------------------------------------------- the load
@dataclass
class Record:
    index: int
    model: str
    stream: bool
    status: int                 # 0: transport error
    latency: float
    ttft: float | None = None
    tokens: int = 0
    completion_id: str | None = None
    problems: list[str] = field(default_factory=list)
    mismatch: bool = False
    warmup: bool = False


@dataclass
class Setup:
    base_url: str
    keys: list[str]
    tenant_names: list[str]
    models: list[list[tuple[str, str | None]]]  # per tenant: (model name sent, reference key)
    prompts: list[str]
    refs: dict
    max_tokens: int
    stream_ratio: float
    run_id: str


def request_plan(setup: Setup, i: int) -> tuple[int, str, str | None, str, bool]:
    rng = random.Random(i)
    t = rng.randrange(len(setup.keys))
    model, ref_key = rng.choice(setup.models[t])
    return t, model, ref_key, rng.choice(setup.prompts), rng.random() < setup.stream_ratio


def _check_stream(lines: list[str], rec: Record, want: tuple[str, str] | None, t0: float,
                  first_text_at: list[float]) -> str:
    events = [ln[6:] for ln in lines if ln.startswith("data: ")]
    done_at = [k for k, e in enumerate(events) if e == "[DONE]"]
    if len(done_at) != 1:
        rec.problems.append(f"{len(done_at)} [DONE] events")
    elif done_at[0] != len(events) - 1:
        rec.problems.append("events after [DONE]")
    chunks, finishes, usage, ids = [], [], 0, set()
    for e in events:
        if e == "[DONE]":
            continue
        try:
            obj = json.loads(e)
        except json.JSONDecodeError:
            rec.problems.append("an event that is not JSON")
            continue
        if "error" in obj:
            rec.problems.append(f"error event: {obj['error'].get('message')}")
            continue
        ids.add(obj.get("id"))
        for c in obj.get("choices") or []:
            chunks.append(c.get("text", ""))
            if c.get("finish_reason") is not None:
                finishes.append(c["finish_reason"])
        if obj.get("usage"):
            usage += 1
            rec.tokens = obj["usage"]["completion_tokens"]
    if len(finishes) != 1:
        rec.problems.append(f"{len(finishes)} finish_reasons")
    if usage != 1:
        rec.problems.append(f"{usage} usage chunks")
    if len(ids) != 1:
        rec.problems.append(f"{len(ids)} completion ids in one stream")
    rec.completion_id = next(iter(ids), None)
    if first_text_at:
        rec.ttft = first_text_at[0] - t0
    text = "".join(chunks)
    if want is not None and (text, finishes[0] if len(finishes) == 1 else None) != want:
        rec.mismatch = True
    return text


async def one_request(client: httpx.AsyncClient, setup: Setup, i: int, warmup: bool) -> Record:
    t, model, ref_key, prompt, stream = request_plan(setup, i)
    rid = f"{setup.run_id}-{i}"
    headers = {"Authorization": f"Bearer {setup.keys[t]}", "X-Request-ID": rid}
    body = {"model": model, "prompt": prompt, "max_tokens": setup.max_tokens, "temperature": 0}
    want = setup.refs.get((ref_key, prompt))
    rec = Record(i, model, stream, 0, 0.0, warmup=warmup)
    t0 = time.perf_counter()
    try:
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
            async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
                rec.status = r.status_code
                if r.status_code != 200:
                    await r.aread()
                    rec.problems.append(f"HTTP {r.status_code}: {r.text[:200]}")
                else:
                    if r.headers.get("x-request-id") != rid:
                        rec.problems.append("x-request-id not echoed")
                    lines, first = [], []
                    async for line in r.aiter_lines():
                        if not first and line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                            first.append(time.perf_counter())
                        lines.append(line)
                    _check_stream(lines, rec, want, t0, first)
        else:
            r = await client.post("/v1/completions", json=body, headers=headers)
            rec.status = r.status_code
            if r.status_code != 200:
                rec.problems.append(f"HTTP {r.status_code}: {r.text[:200]}")
            else:
                if r.headers.get("x-request-id") != rid:
                    rec.problems.append("x-request-id not echoed")
                out = r.json()
                choices = out.get("choices") or []
                if len(choices) != 1 or choices[0].get("finish_reason") is None:
                    rec.problems.append(f"{len(choices)} choices / no finish_reason")
                else:
                    rec.mismatch = want is not None and (choices[0]["text"], choices[0]["finish_reason"]) != want
                rec.completion_id = out.get("id")
                rec.tokens = (out.get("usage") or {}).get("completion_tokens", 0)
    except (httpx.HTTPError, OSError) as exc:
        rec.status = 0
        rec.problems.append(f"transport: {type(exc).__name__}: {exc}")
    rec.latency = time.perf_counter() - t0
    if want is None and rec.status == 200:
        rec.problems.append("no reference for this request")
    return rec


async def run_load(setup: Setup, *, clients: int, warmup_s: float, duration_s: float, timeout: float,
                   server_pid: int | None) -> dict:
    # keepalive_expiry below uvicorn's keep-alive timeout (5 s): with both at 5 s (httpx's
    # default), a connection the server is closing can be picked for the next request, which
    # then fails with ReadError before the server ever sees it (the classic keep-alive race).
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8, keepalive_expiry=2.0)
    records: list[Record] = []
    counter = itertools.count()
    issued = 0
    rss: dict[str, float | None] = {"idle": rss_mb(server_pid)}
    rss_samples: list[float] = []
    start = time.perf_counter()
    warm_end = start + warmup_s
    deadline = warm_end + duration_s

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal issued
        while (now := time.perf_counter()) < deadline:
            i = next(counter)
            issued += 1
            records.append(await one_request(client, setup, i, warmup=now < warm_end))

    async def sampler() -> None:
        await asyncio.sleep(max(0.0, warm_end - time.perf_counter()))
        rss["warm"] = rss_mb(server_pid)
        while time.perf_counter() < deadline:
            value = rss_mb(server_pid)
            if value is not None:
                rss_samples.append(value)
            await asyncio.sleep(1.0)

    async with httpx.AsyncClient(base_url=setup.base_url, timeout=timeout, limits=limits) as client:
        sampler_task = asyncio.create_task(sampler())
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
        await sampler_task
    rss["end"] = rss_mb(server_pid)
    if rss_samples:
        rss["max"] = max(rss_samples + [v for v in (rss["end"],) if v is not None])
    return {"records": records, "issued": issued, "elapsed": elapsed, "rss": rss, "warmup_s": warmup_s,
            "measured_s": elapsed - warmup_s}


# --------------------------------------------------------------------------- setup over HTTP
def setup_tenants_and_adapters(base_url: str, admin_key: str, adapters: list[AdapterSpec], tenants: int,
                               run_id: str) -> tuple[list[str], list[str]]:
    keys, names = [], []
    with httpx.Client(base_url=base_url, timeout=120) as c:
        for t in range(tenants):
            name = f"{run_id}-t{t}"
            r = c.post("/admin/tenants", json={"name": name, "max_concurrent": 100_000, "rate_per_s": 1e6,
                                               "rate_burst": 1_000_000},
                       headers={"Authorization": f"Bearer {admin_key}"})
            r.raise_for_status()
            keys.append(r.json()["api_key"])
            names.append(name)
        for a in adapters:
            r = c.post("/v1/adapters", data={"name": a.name}, headers={"Authorization": f"Bearer {keys[a.tenant]}"},
                       files={"file": (f"{a.name}.zip", a.archive, "application/zip")})
            if r.status_code != 201:
                raise RuntimeError(f"uploading {a.name} failed: HTTP {r.status_code} {r.text[:300]}")
    return keys, names


_METRIC_RE = re.compile(r'^promptfleet_completion_requests_total\{([^}]*)\} ([0-9.e+]+)$')


def server_completed(base_url: str, tenant_names: list[str]) -> int | None:
    """The server's own count of completion requests answered 200 for these tenants."""
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in text.splitlines():
        m = _METRIC_RE.match(line)
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in m.group(1).split(","))
        labels = {k: v.strip('"') for k, v in labels.items()}
        if labels.get("tenant") in tenant_names and labels.get("status") == "200":
            total += float(m.group(2))
    return int(total)


# --------------------------------------------------------------------------- report
def summarize(args: argparse.Namespace, setup: Setup, load: dict, *, model_desc: str, ref_seconds: float,
              server_count: int | None, mode: str) -> dict:
    records: list[Record] = load["records"]
    statuses = Counter(r.status for r in records)
    ok = [r for r in records if r.status == 200 and not r.problems]
    ids = [r.completion_id for r in records if r.status == 200]
    duplicates = len(ids) - len(set(ids))
    problems = Counter(":".join(p.split(":")[:2]) if p.startswith("transport") else p.split(":")[0]
                       for r in records for p in r.problems)
    mismatches = [r for r in records if r.mismatch]
    measured = [r for r in ok if not r.warmup]
    lat = [r.latency for r in measured]
    ttft = [r.ttft for r in measured if r.stream and r.ttft is not None]
    tokens = sum(r.tokens for r in measured)
    rss = load["rss"]
    growth = None if rss.get("warm") is None or rss.get("end") is None else rss["end"] - rss["warm"]
    limit = None if rss.get("warm") is None else max(RSS_GROWTH_LIMIT_MB, RSS_GROWTH_LIMIT_RATIO * rss["warm"])
    client_200 = statuses.get(200, 0)
    checks = {
        "no_5xx": not any(s >= 500 for s in statuses),
        "no_other_errors": all(s == 200 for s in statuses),
        "none_lost": load["issued"] == len(records) and all(r.status == 200 and not r.problems for r in records),
        "no_duplicates": duplicates == 0 and None not in ids,
        "server_count_matches": server_count is None or server_count == client_200,
        "answers_equal_reference": not mismatches,
        "memory_steady": growth is None or growth <= limit,
    }
    measured_s = load["measured_s"]
    return {
        "bench": "load", "mode": mode, "ok": all(checks.values()), "checks": checks,
        "model": model_desc, "device": args.device, "clients": args.clients, "tenants": args.tenants,
        "adapters": args.adapters, "prompts": len(setup.prompts), "max_tokens": args.max_tokens,
        "stream_ratio": args.stream_ratio, "warmup_s": round(load["warmup_s"], 1),
        "duration_s": round(measured_s, 1),
        "requests": {"issued": load["issued"], "answered": len(records), "ok": len(ok),
                     "streamed": sum(r.stream for r in records), "measured": len(measured),
                     "models_used": len({r.model for r in records}),
                     "by_status": {str(k): v for k, v in sorted(statuses.items())},
                     "server_counted_200": server_count, "duplicate_ids": duplicates,
                     "problems": dict(problems), "mismatches": len(mismatches),
                     "mismatch_examples": [{"i": r.index, "model": r.model, "stream": r.stream}
                                           for r in mismatches[:5]],
                     "error_examples": [{"i": r.index, "status": r.status, "stream": r.stream,
                                         "latency_ms": ms(r.latency), "problem": r.problems[0][:160]}
                                        for r in records if r.problems][:5]},
        "latency_ms": {"p50": ms(percentile(lat, 50)), "p99": ms(percentile(lat, 99)),
                       "max": ms(max(lat) if lat else None)},
        "ttft_ms": {"p50": ms(percentile(ttft, 50)), "p99": ms(percentile(ttft, 99))},
        "throughput": {"requests_per_s": round(len(measured) / measured_s, 2) if measured_s else None,
                       "completion_tokens_per_s": round(tokens / measured_s, 1) if measured_s else None},
        "server_rss_mb": {k: (None if v is None else round(v, 1)) for k, v in rss.items()}
        | {"growth": None if growth is None else round(growth, 1), "limit": None if limit is None else round(limit, 1)},
        "reference": {"how": "direct Engine, each (adapter, prompt) once, alone", "distinct": len(setup.refs),
                      "seconds": round(ref_seconds, 1)},
    }


def run(args: argparse.Namespace) -> dict:
    from promptfleet.bench.common import emit
    from promptfleet.platform.random_checkpoint import make_random_checkpoint
    from promptfleet.platform.weights import read_model_config, resolve_checkpoint

    run_id = f"load-{uuid.uuid4().hex[:8]}"
    tmp = tempfile.TemporaryDirectory(prefix="pf-load-")
    root = Path(args.keep) if args.keep else Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    server: OwnServer | None = None
    try:
        if args.model:
            model, model_desc = str(args.model), str(args.model)
        else:
            model = str(make_random_checkpoint(root / f"random-{args.shape}", shape=args.shape, seed=args.seed,
                                               scale=args.scale))
            model_desc = f"random {args.shape} (seed {args.seed}, scale {args.scale})"
        if args.url:
            base_url, admin_key, pid, mode = args.url.rstrip("/"), args.admin_key, args.server_pid, "url"
        else:
            server = OwnServer(args, model, root)   # boots while the references are computed
            base_url, admin_key, pid, mode = server.url, server.admin_key, server.pid, "self-contained"
        adapters = make_adapters(read_model_config(resolve_checkpoint(model)), args.adapters, args.tenants, args.seed)
        prompts = PROMPTS[:args.prompts]
        log.info("computing %d reference answers", (len(adapters) + 1) * len(prompts))
        refs, ref_seconds = compute_references(model, adapters, prompts, args.max_tokens, device=args.device,
                                               dtype=args.dtype)
        if server is not None:
            server.wait_ready()
        else:
            wait_ready(base_url, timeout=120)
        keys, names = setup_tenants_and_adapters(base_url, admin_key, adapters, args.tenants, run_id)
        models = [[(a.name, a.name) for a in adapters if a.tenant == t] + [("gpt2", None)]
                  for t in range(args.tenants)]
        setup = Setup(base_url=base_url, keys=keys, tenant_names=names, models=models, prompts=prompts, refs=refs,
                      max_tokens=args.max_tokens, stream_ratio=args.stream_ratio, run_id=run_id)
        warmup = args.warmup if args.warmup is not None else min(5.0, args.duration / 6)
        log.info("load: %d clients, %.0f s warm-up + %.0f s", args.clients, warmup, args.duration)
        load = asyncio.run(run_load(setup, clients=args.clients, warmup_s=warmup, duration_s=args.duration,
                                    timeout=args.request_timeout, server_pid=pid))
        client_200 = sum(r.status == 200 for r in load["records"])
        count = server_completed(base_url, names)
        deadline = time.monotonic() + 10   # streams are counted when they close: let the last ones land
        while count is not None and count < client_200 and time.monotonic() < deadline:
            time.sleep(0.2)
            count = server_completed(base_url, names)
        result = summarize(args, setup, load, model_desc=model_desc, ref_seconds=ref_seconds, server_count=count,
                           mode=mode)
    finally:
        if server is not None:
            server.stop()
        if not args.keep:
            tmp.cleanup()
    emit(result)
    return result


def _exit_on_sigterm(signum, _frame) -> None:
    raise SystemExit(128 + signum)  # run the finally blocks: the own server is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    result = run(args)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

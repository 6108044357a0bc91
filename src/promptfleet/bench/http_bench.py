"""HTTP overhead and streaming throughput of the API next to the bare engine.

    python -m promptfleet.bench.http_bench --duration 30        # random GPT-2-small-shape checkpoint
    python -m promptfleet.bench.http_bench --model ckpt/ --device cuda

One run measures, on one engine shared by both paths:
  (a) p50/p99 latency of ``max_tokens=1`` completions through HTTP (uvicorn on loopback,
      an httpx client) and through ``engine.complete`` directly: the HTTP overhead;
  (b) ``--concurrency`` streaming clients over ``--adapters`` adapters: against the engine
      directly for ``--duration`` seconds, then the very same requests through HTTP (SSE)
      at the same concurrency: tokens/s, p50/p99 time to first token, errors, and the
      HTTP/engine throughput ratio.
It prints ONE JSON line. The generation cache is off so every request reaches the engine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch
import uvicorn
from safetensors.torch import save as save_safetensors

from promptfleet.adapters.archive import write_adapter_zip
from promptfleet.api import create_app
from promptfleet.bench.common import bench_checkpoint, emit, percentile
from promptfleet.platform.adapter import AdapterPrefix, AdapterWeights, parse_adapter
from promptfleet.platform.config import EngineConfig, ModelConfig
from promptfleet.platform.engine import Engine, EngineStats
from promptfleet.platform.sampling import SamplingParams
from promptfleet.settings import Settings

log = logging.getLogger("promptfleet.bench.http")
PROMPTS = ["The weather today", "Once upon a time", "def main():", "Dear customer,", "In 1905 Einstein",
           "Breaking news:", "The recipe calls for", "Q: What is the capital of"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: a random GPT-2-small-shape one)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of load per path")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--virtual-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per streamed request")
    p.add_argument("--latency-requests", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def ms(value: float) -> float | None:
    return None if math.isnan(value) else round(value * 1000, 2)


def make_adapter(cfg: ModelConfig, n_virtual: int, seed: int) -> tuple[bytes, AdapterWeights]:
    """A seeded random PROMPT_TUNING adapter: the zip of its PEFT ``save_pretrained`` folder
    (for the HTTP upload) and its parsed weights (for the engine-only path)."""
    emb = (torch.randn(n_virtual, cfg.n_embd, generator=torch.Generator().manual_seed(seed)) * 0.5).contiguous()
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n_virtual,
              "token_dim": cfg.n_embd, "num_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "num_transformer_submodules": 1, "base_model_name_or_path": None}
    archive = write_adapter_zip(config, save_safetensors({"prompt_embeddings": emb}))
    return archive, parse_adapter(config, {"prompt_embeddings": emb})


@dataclass
class Load:
    """Outcome of one load phase."""

    tokens: int = 0
    requests: int = 0
    errors: int = 0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # between a stream's chunks after the first (ITL)
    elapsed: float = 0.0

    def summary(self) -> dict:
        return {"tokens_per_s": round(self.tokens / self.elapsed, 2) if self.elapsed else None,
                "requests": self.requests, "tokens": self.tokens, "errors": self.errors,
                "ttft_p50_ms": ms(percentile(self.ttft, 50)), "ttft_p99_ms": ms(percentile(self.ttft, 99)),
                "itl_p50_ms": ms(percentile(self.gaps, 50)), "itl_p99_ms": ms(percentile(self.gaps, 99)),
                "seconds": round(self.elapsed, 2)}


class ServerThread:
    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None,
                                                    access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="bench-uvicorn", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn failed to start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class _StreamClock:
    """One stream's time to first text and the gaps between its texts, into ``load``."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.start = self.last = time.perf_counter()
        self.first: float | None = None

    def text(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now - self.start
        else:
            self.load.gaps.append(now - self.last)
        self.last = now

    def done(self) -> None:
        if self.first is not None:
            self.load.ttft.append(self.first)


async def _http_stream(client: httpx.AsyncClient, body: dict, headers: dict, load: Load) -> None:
    clock = _StreamClock(load)
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and chunk["choices"][0]["text"]:
                clock.text()
            if chunk.get("usage"):
                load.tokens += chunk["usage"]["completion_tokens"]
    clock.done()


async def _engine_stream(engine: Engine, prompt: str, params: SamplingParams, prefix: AdapterPrefix,
                         load: Load) -> None:
    clock = _StreamClock(load)
    async for delta in engine.generate(prompt, params, prefix):
        if delta.text:
            clock.text()
        if delta.finish_reason is not None:
            load.tokens += delta.completion_tokens
    clock.done()


async def run_load(one_request, *, concurrency: int, duration: float | None = None,
                   total: int | None = None) -> Load:
    """``concurrency`` workers taking request numbers 0, 1, 2, ... back to back: until
    ``duration`` seconds have passed (the requests in flight then finish), or until
    ``total`` requests were issued. Throughput counts the whole time, drain included."""
    load = Load()
    deadline = None if duration is None else time.perf_counter() + duration
    counter = iter(range(total if total is not None else 1 << 62))

    async def worker() -> None:
        while deadline is None or time.perf_counter() < deadline:
            i = next(counter, None)
            if i is None:
                return
            try:
                await one_request(i, load)
                load.requests += 1
            except Exception as exc:  # counted, and the worker goes on
                load.errors += 1
                log.warning("request %d failed: %s", i, exc)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    load.elapsed = time.perf_counter() - start
    return load


async def latency(one_call, n: int) -> list[float]:
    out = []
    for i in range(n):
        start = time.perf_counter()
        await one_call(i)
        out.append(time.perf_counter() - start)
    return out


@dataclass(frozen=True)
class HttpPlan:
    """What the client process needs (picklable)."""

    base_url: str
    key: str
    names: tuple[str, ...]
    concurrency: int
    max_tokens: int
    latency_requests: int
    total: int


async def _http_phases(plan: HttpPlan) -> dict:
    headers = {"Authorization": f"Bearer {plan.key}"}
    limits = httpx.Limits(max_connections=plan.concurrency + 8, max_keepalive_connections=plan.concurrency + 8)
    async with httpx.AsyncClient(base_url=plan.base_url, timeout=600, limits=limits) as client:
        one = {"model": plan.names[0], "prompt": PROMPTS[0], "max_tokens": 1, "temperature": 0}

        async def http_one(_i: int) -> None:
            (await client.post("/v1/completions", json=one, headers=headers)).raise_for_status()

        await latency(http_one, 5)
        lat = await latency(http_one, plan.latency_requests)
        body = {"max_tokens": plan.max_tokens, "temperature": 1.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}

        async def http_req(i: int, load: Load) -> None:
            await _http_stream(client, {**body, "model": plan.names[i % len(plan.names)],
                                        "prompt": PROMPTS[i % len(PROMPTS)]}, headers, load)

        cpu0 = time.process_time()
        load = await run_load(http_req, concurrency=plan.concurrency, total=plan.total)
        client_cpu = time.process_time() - cpu0
    return {"latency": lat, "load": load, "client_cpu_s": client_cpu}


def _client_process(plan: HttpPlan, conn) -> None:
    """The HTTP clients run in their own process, as real clients would: the server process
    then holds only the engine and uvicorn, as in production."""
    logging.basicConfig(level=logging.WARNING)
    try:
        conn.send(asyncio.run(_http_phases(plan)))
    except BaseException as exc:
        conn.send(exc)
    finally:
        conn.close()


def run_http_client(plan: HttpPlan) -> dict:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_client_process, args=(plan, child), name="bench-http-client")
    proc.start()
    child.close()
    result = parent.recv()
    proc.join(timeout=60)
    if isinstance(result, BaseException):
        raise RuntimeError(f"the HTTP client process failed: {result}") from result
    return result


async def engine_phases(args: argparse.Namespace, engine: Engine, prefixes: dict[str, AdapterPrefix]) -> dict:
    names = list(prefixes)
    one_params = SamplingParams(max_tokens=1, temperature=0)

    async def engine_one(_i: int) -> None:
        await engine.complete(PROMPTS[0], one_params, prefixes[names[0]])

    await latency(engine_one, 5)
    lat = await latency(engine_one, args.latency_requests)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, ignore_eos=True)

    async def engine_req(i: int, load: Load) -> None:
        await _engine_stream(engine, PROMPTS[i % len(PROMPTS)], params, prefixes[names[i % len(names)]], load)

    log.info("engine-only load: %d streams for %.0f s", args.concurrency, args.duration)
    load = await run_load(engine_req, concurrency=args.concurrency, duration=args.duration)
    return {"latency": lat, "load": load}


def bench(args: argparse.Namespace, engine: Engine, base_url: str) -> dict:
    admin = {"Authorization": "Bearer bench-admin"}
    r = httpx.post(f"{base_url}/admin/tenants", json={"name": "bench"}, headers=admin)
    r.raise_for_status()
    key = r.json()["api_key"]
    names = tuple(f"a{i}" for i in range(args.adapters))
    prefixes = {}
    for i, name in enumerate(names):
        archive, weights = make_adapter(engine.model_config, args.virtual_tokens, args.seed + i)
        httpx.post(f"{base_url}/v1/adapters", data={"name": name}, headers={"Authorization": f"Bearer {key}"},
                   files={"file": ("a.zip", archive, "application/zip")}).raise_for_status()
        prefixes[name] = engine.build_adapter(weights, name)

    s0 = engine.stats()
    eng = asyncio.run(engine_phases(args, engine, prefixes))
    s1 = engine.stats()
    # The HTTP run serves exactly the requests the engine-only run completed, at the same
    # concurrency: both do the same work, drain included.
    log.info("HTTP load: the same %d requests, %d streams (client process)", eng["load"].requests, args.concurrency)
    http = run_http_client(HttpPlan(base_url=base_url, key=key, names=names, concurrency=args.concurrency,
                                    max_tokens=args.max_tokens, latency_requests=args.latency_requests,
                                    total=eng["load"].requests))
    s2 = engine.stats()
    h, e = http["load"].summary(), eng["load"].summary()
    http_lat, eng_lat = http["latency"], eng["latency"]
    return {
        "bench": "http", "device": str(engine.device), "dtype": str(engine.dtype).removeprefix("torch."),
        "model": args.model or "random gpt2 (124M shape)", "threads": torch.get_num_threads(),
        "latency_max_tokens_1": {
            "requests": args.latency_requests,
            "http_p50_ms": ms(percentile(http_lat, 50)), "http_p99_ms": ms(percentile(http_lat, 99)),
            "engine_p50_ms": ms(percentile(eng_lat, 50)), "engine_p99_ms": ms(percentile(eng_lat, 99)),
            "http_overhead_p50_ms": ms(statistics.median(http_lat) - statistics.median(eng_lat))},
        "streaming": {"concurrency": args.concurrency, "adapters": args.adapters, "max_tokens": args.max_tokens,
                      "duration_s": args.duration, "http": h, "engine": e,
                      "throughput_ratio": round(h["tokens_per_s"] / e["tokens_per_s"], 3)
                      if h["tokens_per_s"] and e["tokens_per_s"] else None, "target_ratio": 0.9,
                      # the HTTP clients' own process shares this machine's cores with the
                      # server (the engine-only run's clients are coroutines in the server)
                      "http_client_cpu_cores": round(http["client_cpu_s"] / h["seconds"], 2) if h["seconds"] else None,
                      "engine_work": {"engine_only": _work(s0, s1), "http": _work(s1, s2)}},
    }


def _work(a: EngineStats, b: EngineStats) -> dict:
    """What the engine did between two snapshots (both phases, latency probes included)."""
    steps = b.steps - a.steps
    return {"steps": steps, "prefill_s": round(b.prefill_seconds - a.prefill_seconds, 2),
            "decode_s": round(b.decode_seconds - a.decode_seconds, 2),
            "mean_decode_batch": round((b.decode_row_tokens - a.decode_row_tokens) / max(1, steps), 1)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model = str(bench_checkpoint(args.model, "gpt2", args.seed))
    with tempfile.TemporaryDirectory(prefix="pf-http-bench-") as tmp:
        tmp_path = Path(tmp)
        engine = Engine.from_pretrained(model, EngineConfig(device=args.device, dtype=args.dtype,
                                                            max_batch_size=max(64, args.concurrency)))
        settings = Settings(data_dir=tmp_path / "data", model=model, model_id="gpt2", admin_key="bench-admin",
                            embedded_worker=False, generation_cache_enabled=False, tenant_rate_per_s=1e6,
                            tenant_rate_burst=10**6, tenant_max_concurrent=10**6, max_tokens_limit=4096,
                            max_prompt_tokens=1024, max_queue=10**4, log_level="WARNING")
        try:
            with ServerThread(create_app(settings, engine=engine)) as base_url:
                result = bench(args, engine, base_url)
        finally:
            engine.stop()
    emit(result)
    return result


if __name__ == "__main__":
    main()

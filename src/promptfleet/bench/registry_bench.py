"""Registry benchmark: register many prompt-tuning adapters for a GPT-2-small-shaped
backbone, then time cold resolves (registry lookup + blob read + sha256 check + parse and
validation + KV prefix build) and warm hits of the device cache.

    python -m promptfleet.bench.registry_bench --adapters 10000 --cache-entries 1000

Logs progress to stderr and prints one JSON line of results to stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from sqlalchemy import insert

from promptfleet.adapters.archive import write_adapter_zip
from promptfleet.adapters.device_cache import AdapterCache
from promptfleet.adapters.fingerprint import model_fingerprint
from promptfleet.adapters.models import AdapterVersion
from promptfleet.adapters.service import cache_key, load_adapter_weights, resolve_adapter
from promptfleet.adapters.prefix_store import PrefixStore
from promptfleet.adapters.storage import LocalBlobStorage
from promptfleet.db import make_engine, make_session_factory, session_scope, utcnow
from promptfleet.migrate import upgrade
from promptfleet.platform.adapter import build_prefix, check_fits, parse_adapter_files
from promptfleet.platform.random_checkpoint import SHAPES, make_random_checkpoint
from promptfleet.platform.weights import load_gpt2, weights_id
from promptfleet.tenants.service import create_tenant

log = logging.getLogger("promptfleet.bench.registry")


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in samples_s)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50_ms": round(q[49], 4), "p99_ms": round(q[98], 4), "max_ms": round(ms[-1], 4), "n": len(ms)}


def _register(session_factory, storage: LocalBlobStorage, tenant_id: str, model_config, *, count: int,
              tokens: int, seed: int) -> float:
    """Validate, store one blob each, and bulk-insert the rows; returns the seconds it took."""
    fingerprint = model_fingerprint(model_config)
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": tokens,
              "token_dim": model_config.n_embd, "num_layers": model_config.n_layer,
              "num_attention_heads": model_config.n_head, "num_transformer_submodules": 1,
              "inference_mode": True, "prompt_tuning_init": "RANDOM"}
    config_bytes = json.dumps(config, indent=2, sort_keys=True).encode()
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    rows: list[dict] = []
    for i in range(count):
        st = save_safetensors({"prompt_embeddings": torch.randn(tokens, model_config.n_embd, generator=gen) * 0.5})
        weights = parse_adapter_files(config_bytes, st)
        check_fits(weights, model_config)
        blob = write_adapter_zip(config_bytes, st)
        rows.append(dict(id=uuid.uuid4().hex, tenant_id=tenant_id, name=f"adapter-{i:05d}", version=1,
                         peft_type="PROMPT_TUNING", num_virtual_tokens=tokens,
                         shapes={"prompt_embeddings": [tokens, model_config.n_embd]},
                         base_fingerprint=fingerprint, sha256=storage.put(blob), size_bytes=len(blob),
                         created_at=utcnow(), deleted_at=None, source_job_id=None))
        if len(rows) == 1000 or i == count - 1:
            with session_scope(session_factory) as s:
                s.execute(insert(AdapterVersion), rows)
            log.info("registered %d/%d adapters", i + 1, count)
            rows = []
    return time.perf_counter() - start


def run(args: argparse.Namespace, workdir: Path) -> dict:
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    torch.manual_seed(args.seed)
    log.info("writing a seeded random %s-shaped checkpoint (random weights)", args.shape)
    ckpt = make_random_checkpoint(workdir / args.shape, shape=args.shape, seed=args.seed)
    model = load_gpt2(ckpt, device=args.device)
    cfg = model.config
    db_url = args.db_url or f"sqlite:///{workdir / 'registry.db'}"
    upgrade(db_url)
    engine = make_engine(db_url)
    session_factory = make_session_factory(engine)
    storage = LocalBlobStorage(workdir / "blobs")
    with session_scope(session_factory) as s:
        tenant, _ = create_tenant(s, name=f"bench-{uuid.uuid4().hex[:8]}")
        tenant_id = tenant.id
    register_s = _register(session_factory, storage, tenant_id, cfg, count=args.adapters,
                           tokens=args.virtual_tokens, seed=args.seed)

    prefix_bytes = 2 * cfg.n_layer * cfg.n_embd * args.virtual_tokens * next(model.parameters()).element_size()
    store = PrefixStore(workdir / "prefixes", weights_id=weights_id(ckpt), dtype=next(model.parameters()).dtype,
                        device=args.device)
    build = store.builder(lambda w, key: build_prefix(model, w, key))
    cache = AdapterCache(build, budget_bytes=args.cache_entries * prefix_bytes)
    names = [f"adapter-{i:05d}" for i in range(args.adapters)]
    rng = random.Random(args.seed)
    cold_order = rng.sample(names, min(args.cold_samples, len(names)))
    parts: dict[str, list[float]] = {"lookup": [], "blob_parse": [], "registry": [], "prefix_build": [],
                                     "total": []}
    key_of: dict[str, str] = {}

    build_prefix(model, load_adapter_weights(storage=storage, version=_resolve(session_factory, tenant_id,
                                                                                 names[0], cfg)), "warmup")
    log.info("timing %d cold resolves (prefix built and stored)", len(cold_order))
    for n, name in enumerate(cold_order):
        t0 = time.perf_counter()
        version = _resolve(session_factory, tenant_id, name, cfg)
        t1 = time.perf_counter()
        timing = {}

        def load(version=version, timing=timing):
            a = time.perf_counter()
            weights = load_adapter_weights(storage=storage, version=version)
            timing["blob_parse"] = time.perf_counter() - a
            return weights

        key_of[name] = cache_key(version)
        cache.get_or_load(key_of[name], load)
        _sync(args.device)
        t2 = time.perf_counter()
        parts["lookup"].append(t1 - t0)
        parts["blob_parse"].append(timing["blob_parse"])
        parts["registry"].append(t1 - t0 + timing["blob_parse"])  # everything but the prefix build
        parts["prefix_build"].append(t2 - t1 - timing["blob_parse"])
        parts["total"].append(t2 - t0)
        if (n + 1) % 200 == 0:
            log.info("cold %d/%d", n + 1, len(cold_order))
    stats_after_build = cache.stats()
    # Phase 2: the same adapters cold again (device cache emptied), their prefixes now in
    # the disk tier, as they are after upload-time precomputation in the API.
    cache.clear()
    stored_parts: dict[str, list[float]] = {"total": [], "prefix_load": []}
    for name in cold_order:
        t0 = time.perf_counter()
        version = _resolve(session_factory, tenant_id, name, cfg)
        t1 = time.perf_counter()
        cache.get_or_load(cache_key(version), lambda version=version: load_adapter_weights(storage=storage,
                                                                                          version=version))
        _sync(args.device)
        t2 = time.perf_counter()
        stored_parts["total"].append(t2 - t0)
        stored_parts["prefix_load"].append(t2 - t1)

    cached_keys = [key for key in key_of.values() if key in cache]
    never = lambda: (_ for _ in ()).throw(AssertionError("a warm hit loaded weights"))  # noqa: E731
    warm: list[float] = []
    for key in (rng.choice(cached_keys) for _ in range(args.warm_samples)):
        t0 = time.perf_counter()
        cache.get_or_load(key, never)
        warm.append(time.perf_counter() - t0)
    warm_resolve: list[float] = []
    cached_names = [name for name, key in key_of.items() if key in cache]
    for name in rng.sample(cached_names, min(len(cached_names), 1000)):
        t0 = time.perf_counter()
        version = _resolve(session_factory, tenant_id, name, cfg)
        cache.get_or_load(cache_key(version), never)
        warm_resolve.append(time.perf_counter() - t0)
    blob_bytes = _resolve(session_factory, tenant_id, names[0], cfg).size_bytes
    engine.dispose()
    final = cache.stats()
    return {
        "bench": "registry", "adapters": args.adapters, "virtual_tokens": args.virtual_tokens,
        "backbone": model_fingerprint(cfg), "db": db_url.split(":", 1)[0], "device": args.device,
        "threads": args.threads,
        "register_s": round(register_s, 2), "register_per_adapter_ms": round(register_s / args.adapters * 1e3, 3),
        "blob_bytes": blob_bytes,
        "cold_built": {k: _percentiles(v) for k, v in parts.items()},
        "cold_stored": {k: _percentiles(v) for k, v in stored_parts.items()},
        "prefix_store": {"hits": store.hits, "misses": store.misses, "corrupt": store.corrupt},
        "warm_hit": _percentiles(warm),
        "warm_resolve_and_hit": _percentiles(warm_resolve) if warm_resolve else None,
        "cache": {"entries": final.entries, "budget_mb": round(final.budget_bytes / 2**20, 1),
                  "bytes_used_mb": round(final.bytes_used / 2**20, 1), "hits": final.hits,
                  "misses": final.misses, "evictions": final.evictions,
                  "evictions_during_cold": stats_after_build.evictions},
        "targets": {"cold_p99_ms": 20.0, "warm_p99_ms": 0.1},
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # other processes share the CPU?
    }


def _resolve(session_factory, tenant_id: str, name: str, cfg) -> AdapterVersion:
    with session_factory() as s:
        return resolve_adapter(s, tenant_id=tenant_id, ref=name, model_config=cfg)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    parser.add_argument("--cache-entries", type=int, default=1000, help="device cache budget, in prefixes")
    parser.add_argument("--cold-samples", type=int, default=1200, help="distinct adapters loaded cold")
    parser.add_argument("--warm-samples", type=int, default=20_000)
    parser.add_argument("--shape", default="gpt2", choices=sorted(SHAPES), help="backbone shape (random weights)")
    parser.add_argument("--device", default="cpu", help="where prefixes are built (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--db-url", default=None, help="default: a SQLite file in the work dir")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="pf-registry-bench-") as tmp:
            result = run(args, Path(tmp))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

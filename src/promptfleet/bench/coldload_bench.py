"""Cold-load latency of an adapter from S3 on a replica that has never seen it
(``python -m promptfleet.bench.coldload_bench``): what the first request for an adapter
waits for before its prefill, with the built KV prefix already in the bucket (another
replica built it) vs built here.

Against ``--endpoint`` (or ``AWS_ENDPOINT_URL``), else a ``moto_server`` this bench starts
and stops. ``--adapters`` seeded random prompt-tuning adapters (``--virtual`` tokens) are
stored in a fresh bucket through ``S3BlobStorage``; then, for each adapter in turn, on the
serving backbone (default: a GPT-2-small-shaped random checkpoint; ``--model`` a dir):

* built: a fresh replica (empty device cache, empty local prefix dir) loads it: S3 get of
  the adapter blob (sha256 checked), parse, the backbone's forward over the virtual tokens,
  and the prefix written to local disk and to the bucket (what the request path does);
* stored: another fresh replica loads it: S3 get of the prefix another replica stored
  (checked), decode, kept on local disk;
* disk: that replica again with an empty device cache (a restart): its local prefix file;
* device: a warm device-cache hit.

Prints one JSON line per path with p50/p99/mean in ms (the database lookup that precedes
it on a request is not included). Each path is checked to be the one taken (the prefix
store's hit/miss counters), so a figure cannot come from the wrong tier.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

PATHS = ("built", "stored", "disk", "device")


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m promptfleet.bench.coldload_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL"),
                    help="S3 endpoint (default: AWS_ENDPOINT_URL, else a moto_server started here)")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: random GPT-2-small shape)")
    ap.add_argument("--adapters", type=int, default=60)
    ap.add_argument("--virtual", type=int, default=20, help="virtual tokens per adapter")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def _bucket(endpoint: str) -> str:
    import boto3

    name = f"promptfleet-coldload-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name=os.environ.get("AWS_REGION", "us-east-1"),
                 aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
                 aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing")).create_bucket(Bucket=name)
    return name


def _summary(path: str, seconds: list[float]) -> dict:
    from promptfleet.bench.common import percentile

    ms = [s * 1000 for s in seconds]
    return {"path": path, "n": len(ms), "p50_ms": round(percentile(ms, 50), 3), "p99_ms": round(percentile(ms, 99), 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


def run(args: argparse.Namespace, endpoint: str) -> list[dict]:
    from promptfleet.adapters.blob_url import S3Location
    from promptfleet.adapters.device_cache import AdapterCache
    from promptfleet.adapters.fingerprint import model_fingerprint
    from promptfleet.adapters.models import AdapterVersion
    from promptfleet.adapters.prefix_store import PrefixStore
    from promptfleet.adapters.s3_storage import S3BlobStorage, S3Config, S3SharedPrefixes
    from promptfleet.adapters.service import cache_key, load_adapter_weights
    from promptfleet.bench.common import bench_checkpoint
    from promptfleet.bench.http_bench import make_adapter
    from promptfleet.platform.config import EngineConfig
    from promptfleet.platform.engine import Engine

    storage = S3BlobStorage(S3Location(_bucket(endpoint), "pf"), S3Config.from_env(endpoint_url=endpoint))
    shared = S3SharedPrefixes(storage.objects)
    engine = Engine.from_pretrained(bench_checkpoint(args.model),  # only prefix builds run: a small KV cache
                                   EngineConfig(device="cpu", kv_cache_bytes=64 << 20, max_model_len=256,
                                                max_batch_size=2))
    fingerprint = model_fingerprint(engine.model_config)
    versions = []
    for i in range(args.adapters):
        archive, _ = make_adapter(engine.model_config, args.virtual, args.seed + i)
        versions.append(AdapterVersion(name=f"a{i}", version=1, sha256=storage.put(archive),
                                       base_fingerprint=fingerprint))
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    root = Path(tempfile.mkdtemp(prefix="pf-coldload-"))

    def replica(name: str) -> tuple[PrefixStore, AdapterCache]:
        store = PrefixStore(root / name, weights_id=engine.weights_id, dtype=engine.dtype, device=engine.device,
                            shared=shared)
        return store, AdapterCache(store.builder(engine.build_adapter, check_stored=False), 256 << 20,
                                   stored=store.load)

    def timed(cache: AdapterCache, version: AdapterVersion) -> float:
        t0 = time.perf_counter()
        cache.get_or_load(cache_key(version), lambda: load_adapter_weights(storage=storage, version=version))
        return time.perf_counter() - t0

    try:
        replica("warmup")[1].get_or_load(cache_key(versions[0]), lambda: load_adapter_weights(
            storage=storage, version=versions[0]))  # first-call costs (allocator, client) out of the figures
        for i, version in enumerate(versions[1:], 1):
            builder_store, builder = replica(f"r{i}-builder")
            times["built"].append(timed(builder, version))
            assert builder_store.misses == 1 and builder_store.hits == 0, "built: the prefix was found stored"
            reader_store, reader = replica(f"r{i}-reader")
            times["stored"].append(timed(reader, version))
            assert reader_store.shared_hits == 1, "stored: the prefix was not read from the bucket"
            restarted = AdapterCache(reader_store.builder(engine.build_adapter, check_stored=False), 256 << 20,
                                     stored=reader_store.load)
            times["disk"].append(timed(restarted, version))
            assert reader_store.hits == 2 and reader_store.shared_hits == 1, "disk: not the local prefix file"
            times["device"].append(timed(restarted, version))
            assert restarted.stats().hits == 1, "device: not a device-cache hit"
    finally:
        engine.stop()
    return [_summary(p, times[p]) for p in PATHS]


def main(argv: list[str] | None = None) -> None:
    from promptfleet.adapters.s3_local import start_moto_server

    logging.basicConfig(level=logging.WARNING)
    args = _args(argv)
    server = None if args.endpoint else start_moto_server()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    try:
        endpoint = args.endpoint or server.endpoint  # type: ignore[union-attr]
        rows = run(args, endpoint)
    finally:
        if server is not None:
            server.stop()
    load = os.getloadavg()[0]
    print(json.dumps({"endpoint": "moto_server (started here)" if server else endpoint, "model": args.model or
                      "random gpt2-small shape", "adapters": args.adapters, "virtual_tokens": args.virtual,
                      "loadavg_1m": round(load, 2)}))
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()

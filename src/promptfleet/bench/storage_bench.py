"""S3 client libraries side by side: put/get latency and throughput against one
S3-protocol server (``promptfleet bench storage``).

Against ``--endpoint`` (or ``AWS_ENDPOINT_URL``), else a ``moto_server`` this bench starts
and stops. Each client writes and reads the same objects (fresh keys per round, so no
cache helps) at a few sizes: an adapter (16 KiB), a prefix (1 MiB), a large dataset (32
MiB, multipart). Reported per client and size: p50/p90 put and get latency (ms) and MB/s.
Clients: ``boto3`` (put_object/get_object; ``upload_fileobj``/``download_fileobj`` with
multipart chunks above 8 MiB, as ``S3BlobStorage`` does), ``obstore`` (Rust
object_store; multipart above its chunk size) when installed, and ``blobstore``:
``S3BlobStorage`` itself (boto3 + the existence check, sha256 verification on read).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

MULTIPART_BYTES = 8 << 20


@dataclass
class BenchConfig:
    endpoint: str
    bucket: str
    sizes: tuple[int, ...] = (16 << 10, 1 << 20, 32 << 20)
    rounds: int = 20
    large_rounds: int = 3
    clients: tuple[str, ...] = ("boto3", "obstore", "blobstore")


@dataclass
class Row:
    client: str
    size_bytes: int
    rounds: int
    put_p50_ms: float
    put_p90_ms: float
    get_p50_ms: float
    get_p90_ms: float
    put_mb_s: float
    get_mb_s: float


Client = tuple[Callable[[str, bytes], None], Callable[[str], bytes]]


def _credentials() -> dict[str, str]:
    return {"id": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            "secret": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
            "region": os.environ.get("AWS_REGION", "us-east-1")}


def boto3_client(cfg: BenchConfig) -> Client:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    c = _credentials()
    s3 = boto3.client("s3", endpoint_url=cfg.endpoint, aws_access_key_id=c["id"], aws_secret_access_key=c["secret"],
                      region_name=c["region"], config=Config(s3={"addressing_style": "path"}))
    tc = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES)

    def put(key: str, data: bytes) -> None:
        if len(data) < MULTIPART_BYTES:
            s3.put_object(Bucket=cfg.bucket, Key=key, Body=data)
        else:
            s3.upload_fileobj(io.BytesIO(data), cfg.bucket, key, Config=tc)

    def get(key: str) -> bytes:
        obj = s3.get_object(Bucket=cfg.bucket, Key=key)
        if obj["ContentLength"] < MULTIPART_BYTES:
            return obj["Body"].read()
        obj["Body"].close()
        buf = io.BytesIO()
        s3.download_fileobj(cfg.bucket, key, buf, Config=tc)
        return buf.getvalue()

    return put, get


def obstore_client(cfg: BenchConfig) -> Client:
    import obstore
    from obstore.store import S3Store

    c = _credentials()
    store = S3Store(cfg.bucket, endpoint=cfg.endpoint, access_key_id=c["id"], secret_access_key=c["secret"],
                    region=c["region"], virtual_hosted_style_request=False, client_options={"allow_http": True})

    def put(key: str, data: bytes) -> None:
        obstore.put(store, key, data, chunk_size=MULTIPART_BYTES)

    def get(key: str) -> bytes:
        return bytes(obstore.get(store, key).bytes())

    return put, get


def blobstore_client(cfg: BenchConfig) -> Client:
    from promptfleet.adapters.blob_url import S3Location
    from promptfleet.adapters.s3_storage import S3BlobStorage, S3Config

    c = _credentials()
    store = S3BlobStorage(S3Location(bucket=cfg.bucket, prefix="bench-blobstore"),
                          S3Config(endpoint_url=cfg.endpoint, access_key_id=c["id"], secret_access_key=c["secret"],
                                   region=c["region"]))
    return (lambda _key, data: store.put(data) and None), (lambda key: store.get(key))


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_client(name: str, client: Client, size: int, rounds: int) -> Row:
    put, get = client
    puts, gets = [], []
    for _ in range(rounds):
        data = os.urandom(size)  # fresh bytes: a fresh content address for blobstore too
        key = f"bench/{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        put(key, data)
        t1 = time.perf_counter()
        got = get(key if name != "blobstore" else __import__("hashlib").sha256(data).hexdigest())
        t2 = time.perf_counter()
        if got != data:
            raise AssertionError(f"{name}: read back different bytes at size {size}")
        puts.append(t1 - t0)
        gets.append(t2 - t1)
    mb = size / 1e6
    return Row(client=name, size_bytes=size, rounds=rounds,
               put_p50_ms=round(_pct(puts, 0.5) * 1e3, 2), put_p90_ms=round(_pct(puts, 0.9) * 1e3, 2),
               get_p50_ms=round(_pct(gets, 0.5) * 1e3, 2), get_p90_ms=round(_pct(gets, 0.9) * 1e3, 2),
               put_mb_s=round(mb / statistics.median(puts), 1), get_mb_s=round(mb / statistics.median(gets), 1))


def run(cfg: BenchConfig) -> list[Row]:
    import boto3

    c = _credentials()
    boto3.client("s3", endpoint_url=cfg.endpoint, aws_access_key_id=c["id"], aws_secret_access_key=c["secret"],
                 region_name=c["region"]).create_bucket(Bucket=cfg.bucket)
    makers = {"boto3": boto3_client, "obstore": obstore_client, "blobstore": blobstore_client}
    rows = []
    for name in cfg.clients:
        try:
            client = makers[name](cfg)
        except ImportError as exc:
            log.warning("skipping %s: %s", name, exc)
            continue
        client[0]("bench/warmup", b"x")  # connection set up outside the timings
        for size in cfg.sizes:
            rounds = cfg.rounds if size < MULTIPART_BYTES else cfg.large_rounds
            rows.append(bench_client(name, client, size, rounds))
            log.info("%s", rows[-1])
    return rows


def main(argv: list[str] | None = None) -> None:
    from promptfleet.adapters.s3_local import start_moto_server

    ap = argparse.ArgumentParser(prog="promptfleet bench storage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint", default=os.environ.get("AWS_ENDPOINT_URL"),
                    help="S3 endpoint (default: AWS_ENDPOINT_URL, else a moto_server started here)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--large-rounds", type=int, default=3)
    ap.add_argument("--sizes", default="16384,1048576,33554432", help="object sizes in bytes, comma-separated")
    ap.add_argument("--clients", default="boto3,obstore,blobstore")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = None if args.endpoint else start_moto_server()
    try:
        cfg = BenchConfig(endpoint=args.endpoint or server.endpoint, bucket=f"promptfleet-bench-{uuid.uuid4().hex[:8]}",
                          sizes=tuple(int(s) for s in args.sizes.split(",")), rounds=args.rounds,
                          large_rounds=args.large_rounds, clients=tuple(args.clients.split(",")))
        rows = run(cfg)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps({"endpoint": "moto_server (started here)" if server else cfg.endpoint,
                      "rows": [asdict(r) for r in rows]}, indent=2))


if __name__ == "__main__":
    main()

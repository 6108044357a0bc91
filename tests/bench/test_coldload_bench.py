"""The cold-load bench on a tiny checkpoint against moto: one row per path, each path
checked by the bench itself to be the tier it names (the prefix store's counters), and
figures the wall clock around the call can hold (no timing is asserted between paths)."""
from __future__ import annotations

import argparse
import os
import time

from promptfleet.bench.coldload_bench import PATHS, run
from promptfleet.testing.s3 import s3_bucket, s3_endpoint  # noqa: F401 - session moto_server


def test_coldload_bench_reports_each_tier(tiny_checkpoint, s3_bucket):  # noqa: F811 - sets the AWS_* env
    args = argparse.Namespace(model=str(tiny_checkpoint), adapters=4, virtual=3, seed=0)
    t0 = time.perf_counter()
    rows = run(args, os.environ["AWS_ENDPOINT_URL"])
    wall_ms = (time.perf_counter() - t0) * 1000
    assert [r["path"] for r in rows] == list(PATHS)
    for r in rows:
        assert r["n"] == 3 and 0 <= r["p50_ms"] <= r["p99_ms"] and r["mean_ms"] * r["n"] < wall_ms, r

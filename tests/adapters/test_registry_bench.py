"""Smoke test of the registry benchmark on a tiny backbone: it runs and prints one JSON line."""
from __future__ import annotations

import json

from promptfleet.bench.registry_bench import main


def test_registry_bench_smoke(capsys, tmp_path):
    assert main(["--shape", "tiny", "--adapters", "30", "--virtual-tokens", "4", "--cache-entries", "5",
                 "--cold-samples", "8", "--warm-samples", "100", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["adapters"] == 30 and result["backbone"] == "gpt2-L2-H4-D64-V50257-P1024"
    assert result["cold_built"]["total"]["n"] == 8 and result["cold_stored"]["total"]["n"] == 8 and result["warm_hit"]["n"] == 100
    assert result["cache"] == {**result["cache"], "entries": 5, "misses": 16, "evictions": 6}
    assert result["warm_hit"]["p99_ms"] < result["cold_built"]["total"]["p99_ms"]

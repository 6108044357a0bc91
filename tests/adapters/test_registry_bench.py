"""Smoke test of the registry benchmark on a tiny backbone: it runs, prints one JSON line,
and its counters say each phase measured what it names."""
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
    # what was measured, not how fast (a loaded machine can reorder percentiles): every warm
    # lookup (100 samples + the 5 resolved by name) was a device-cache hit that loaded nothing
    # (the bench's loader raises if asked), and every stored-prefix cold load read the disk
    # tier instead of rebuilding the prefix
    assert result["cache"]["hits"] == 100 + result["warm_resolve_and_hit"]["n"] == 105
    assert result["prefix_store"] == {"hits": 8, "misses": 8, "corrupt": 0}

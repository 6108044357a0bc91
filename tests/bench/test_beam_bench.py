"""The beam benchmark runs end to end on a tiny model and reports what it measured: our
engine's best beams equal transformers' (one at a time and batched), and our forks copy
less KV than transformers' reorder moves."""
from __future__ import annotations

from promptfleet.bench.beam_bench import run


def test_beam_bench_reports_parity_and_kv_copies(tiny_checkpoint):
    result = run(tiny_checkpoint, requests=3, beams=3, new_tokens=6, prompt_len=5)
    assert result["parity_one_at_a_time"] is True and result["parity_batched"] is True
    assert 0 <= result["kv_mb_copied_per_search_ours"] < result["kv_mb_moved_per_search_hf_reorder"]
    assert result["ours_searches_per_s"] > 0 and result["ratio_vs_hf_one_at_a_time"] > 0

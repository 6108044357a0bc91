"""Smoke test of the engine benchmark on a tiny backbone: every line of (a)-(d) runs, and
the side-by-side kernel comparison runs its second engine."""
from __future__ import annotations

import json

import pytest

from promptfleet.bench.engine_bench import main


def test_engine_bench_smoke(capsys, tiny_checkpoint):
    main(["--model", str(tiny_checkpoint), "--requests", "4", "--prompt-tokens", "5", "--new-tokens", "6",
          "--virtual-tokens", "3", "--rounds", "1", "--peft-requests", "1", "--compare-kernels", "torch,sdpa"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    for key in ("a_mixed_adapters_tok_s", "b_one_adapter_tok_s", "c_peft_sequential_tok_s",
                "c2_hf_cached_soft_prompt_sequential_tok_s", "compare_a_tok_s", "decode_gflops"):
        assert result[key] > 0, key
    assert result["compare_kernels"] == "torch,sdpa"
    # figures are rounded before they are printed: ratios agree to that rounding
    ratio = result["a_mixed_adapters_tok_s"] / result["c_peft_sequential_tok_s"]
    assert result["a_over_c"] == pytest.approx(ratio, rel=0.02)
    assert result["decode_mfu"] == pytest.approx(result["decode_gflops"] / result["d_matmul_peak_gflops"], abs=2e-3)
    assert result["d_matmul_peak_gflops"] == max(result["d_peak_by_kernel_gflops"].values())
    # the peak is sampled before, between and after the rounds; the highest is reported
    assert len(result["d_peak_samples_gflops"]) == 3  # 1 round
    assert result["d_matmul_peak_gflops"] == pytest.approx(max(result["d_peak_samples_gflops"]), abs=0.11)

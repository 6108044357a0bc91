"""Smoke test of the engine benchmark on a tiny backbone: every line of (a)-(d) runs, the
side-by-side kernel comparison runs its second engine, and its figures agree with what the
test knows independently (the checkpoint's own config, the wall clock around the call,
the bound that no computation beats the measured matmul peak)."""
from __future__ import annotations

import json
import time

from promptfleet.bench.engine_bench import main


def test_engine_bench_smoke(capsys, tiny_checkpoint):
    started = time.perf_counter()
    main(["--model", str(tiny_checkpoint), "--requests", "4", "--prompt-tokens", "5", "--new-tokens", "6",
          "--virtual-tokens", "3", "--rounds", "1", "--peft-requests", "1", "--compare-kernels", "torch,sdpa"])
    wall_s = time.perf_counter() - started
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert result["model"].startswith(f"gpt2 L{config['n_layer']} d{config['n_embd']} ")
    assert (result["requests"], result["new_tokens"], result["prompt_tokens"]) == (4, 6, 5)
    assert result["compare_kernels"] == "torch,sdpa"
    tokens = 4 * 6
    for key in ("a_mixed_adapters_tok_s", "b_one_adapter_tok_s", "c_peft_sequential_tok_s",
                "c2_hf_cached_soft_prompt_sequential_tok_s", "compare_a_tok_s"):
        # each figure is tokens over the wall time of a run that happened inside this call:
        # positive, and never so low that the run would have outlasted the call itself
        assert result[key] > 0 and tokens / result[key] <= wall_s, (key, result[key], wall_s)
    assert 0 < result["decode_step_ms_at_batch"] / 1000 <= wall_s
    assert 0 < result["decode_gflops"] and 0 < result["decode_mfu"] <= 1  # nothing beats the measured peak
    assert result["d_matmul_peak_gflops"] == max(result["d_peak_samples_gflops"])
    assert len(result["d_peak_samples_gflops"]) == 3  # before, after the 1 round, and at the end

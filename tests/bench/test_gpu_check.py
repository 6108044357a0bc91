"""The prepared device check, dry-run on CPU on a tiny random checkpoint so it cannot rot:
scripts/gpu_check.sh runs promptfleet.bench.gpu_check (logits against transformers' model,
mixed adapter batches against SDPA and PEFT) and the engine bench, as on a device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from promptfleet.bench import gpu_check
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.platform.random_checkpoint import make_random_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_of_the_device_script(tmp_path):
    ckpt = make_random_checkpoint(tmp_path / "tiny", shape="tiny", seed=0, scale=3.0)
    env = {**os.environ, "DEVICE": "cpu", "DTYPE": "float32", "SHAPE": "tiny", "BACKENDS": "sdpa",
           "OUT": str(tmp_path / "out"), "PYTHON": sys.executable,
           "BENCH_ARGS": f"--model {ckpt} --requests 2 --prompt-tokens 4 --new-tokens 4 --virtual-tokens 3 "
                         "--rounds 1 --max-model-len 64 --peak-seconds 0.1"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["ok"] and report["backends"] == ["sdpa"] and report["versions"]["torch"]
    sdpa = report["sdpa"]
    for phase in ("prefill", "chunk_on_prefix", "decode"):
        assert sdpa["logits"][phase]["mean_abs_max"] < 1e-4, phase  # fp32: transformers' logits
    assert sdpa["tokens_vs_peft"] == {"requests": 8, "exact": 8, "near_tie": 0, "differ": []}
    bench = [json.loads(line) for line in (tmp_path / "out" / "bench.jsonl").read_text().splitlines()]
    assert [b["attention"] for b in bench] == ["sdpa"] and bench[0]["a_mixed_adapters_tok_s"] > 0


def test_a_wrong_engine_fails_the_check(monkeypatch, tmp_path):
    """The check can fail: logits that drift from transformers' are reported."""
    ckpt = make_random_checkpoint(tmp_path / "tiny", shape="tiny", seed=0, scale=3.0)
    engine = Engine.from_pretrained(ckpt, EngineConfig(attention="sdpa", max_batch_size=4, max_model_len=64))
    hf = gpu_check.hf_model(ckpt, None, engine.device, engine.dtype)
    cfg = gpu_check.CheckConfig(device="cpu", dtype="float32", decode_steps=2)
    assert gpu_check.logits_check(engine, hf, cfg)["ok"]
    real = gpu_check._engine_logits
    monkeypatch.setattr(gpu_check, "_engine_logits", lambda *a: real(*a) + 0.02)
    assert not gpu_check.logits_check(engine, hf, cfg)["ok"]

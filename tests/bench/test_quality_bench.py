"""``promptfleet bench quality`` smoke test on a tiny seeded random Llama: every task's data
generates, trains through the job's training function with the job defaults, and the
table prints zero-shot vs tuned accuracy and times (the figures of a random model mean
nothing; the real run is on SmolLM2)."""
from __future__ import annotations

import json

import pytest
import torch

from promptfleet.bench import quality_bench
from promptfleet.bench.quality_tasks import TASKS
from promptfleet.platform.random_checkpoint import make_random_llama_checkpoint


def test_tasks_are_deterministic_and_hold_out_by_content():
    for name, make in TASKS.items():
        task = make(0, 40, 16)
        assert task == make(0, 40, 16) and task != make(1, 40, 16), name
        assert len(task.train) == 40 and task.test
        train_prompts = {e["prompt"] for e in task.train}
        assert not train_prompts & {e["prompt"] for e in task.test}, name
    capitals = TASKS["capital_json"](0, 40, 16)
    assert json.loads(capitals.test[0]["completion"])["capital"]
    assert {e["completion"] for e in TASKS["sentiment"](0, 40, 16).test} == {" positive", " negative"}


def test_bench_prints_the_table(tmp_path, capsys):
    torch.set_num_threads(1)
    ckpt = make_random_llama_checkpoint(tmp_path / "llama", shape="llama-tiny", seed=2, scale=4.0)
    rows = quality_bench.main(["--model", str(ckpt), "--train-examples", "8", "--test-examples", "4",
                               "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert [r["task"] for r in rows] == list(TASKS)
    for row in rows:
        assert 0.0 <= row["zero_shot_accuracy"] <= 1.0 and 0.0 <= row["tuned_accuracy"] <= 1.0
        assert row["train_seconds"] > 0 and len(row["epochs"]) == 4  # the job default
        assert row["target_met"] == quality_bench.met(row["zero_shot_accuracy"], row["tuned_accuracy"])
        assert row["task"] in out
        assert 0.0 <= row["client_default_accuracy"] <= 1.0 and row["tuned_decoding"] in out
        assert row["generation_defaults"]["max_tokens"] >= 1
    assert "zero-shot" in out and "tuned" in out and "train s" in out and "T=1" in out
    assert json.loads((tmp_path / "out.json").read_text()) == json.loads(json.dumps(rows))
    with pytest.raises(SystemExit):
        quality_bench.main(["--model", str(ckpt), "--tasks", "nope"])

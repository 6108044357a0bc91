"""The CLI progress bar follows a job to its final state."""
from __future__ import annotations

import io

import pytest

from promptfleet.trainer.watch import watch_job


def test_watch_job_draws_progress_until_final():
    states = iter([
        {"status": "queued", "step": 0, "total_steps": None, "metrics": {}},
        {"status": "running", "step": 0, "total_steps": 10, "metrics": {}},
        {"status": "running", "step": 4, "total_steps": 10, "metrics": {"loss": [3.0, 2.5, 2.0, 1.5]}},
        {"status": "succeeded", "step": 10, "total_steps": 10, "metrics": {"loss": [1.0]}, "adapter": "a@1"},
        {"status": "never reached"},
    ])
    out = io.StringIO()
    final = watch_job(lambda: next(states), interval=0.0, out=out)
    assert final["adapter"] == "a@1"
    text = out.getvalue()
    assert "4/10" in text and "10/10" in text and "loss=1.5000" in text and "succeeded" in text


def test_watch_job_times_out():
    with pytest.raises(TimeoutError, match="still running"):
        watch_job(lambda: {"status": "running", "step": 1, "total_steps": 5}, interval=0.01, out=io.StringIO(),
                  timeout=0.05)


def test_watch_job_prints_zero_shot_and_each_epoch_once():
    m1 = {"loss": [2.0], "zero_shot": {"val_loss": 5.5, "val_accuracy": 0.125}}
    m2 = {**m1, "epochs": [{"epoch": 1, "train_loss": 1.25, "val_loss": 0.75, "val_accuracy": 0.5}]}
    m3 = {**m2, "epochs": m2["epochs"] + [{"epoch": 2, "train_loss": 0.5, "val_loss": 0.25, "val_accuracy": 0.875}],
          "stopped_early": True, "best_epoch": 2}
    states = iter([{"status": "running", "step": 1, "total_steps": 4, "metrics": m1},
                   {"status": "running", "step": 2, "total_steps": 4, "metrics": m2},
                   {"status": "running", "step": 2, "total_steps": 4, "metrics": m2},
                   {"status": "succeeded", "step": 4, "total_steps": 4, "metrics": m3}])
    out = io.StringIO()
    watch_job(lambda: next(states), interval=0.0, out=out)
    text = out.getvalue()
    assert text.count("zero-shot  val_loss 5.5000  val_accuracy 12.5%") == 1
    assert text.count("epoch   1  train_loss 1.2500  val_loss 0.7500  val_accuracy 50.0%") == 1
    assert "epoch   2  train_loss 0.5000  val_loss 0.2500  val_accuracy 87.5%" in text
    assert "stopped early; kept epoch 2" in text and "val_acc=87.5%" in text

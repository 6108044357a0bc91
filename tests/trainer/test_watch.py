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

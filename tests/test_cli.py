"""``promptfleet serve``'s settings: a bundled model is listed under its own name, and an
explicit PROMPTFLEET_MODEL_ID (or a checkpoint path) keeps what it says."""
from __future__ import annotations

from promptfleet.cli import serve_settings


def test_a_bundled_model_is_listed_under_its_own_name(monkeypatch):
    monkeypatch.delenv("PROMPTFLEET_MODEL_ID", raising=False)
    assert serve_settings(model="smollm2-135m").model_id == "smollm2-135m"
    assert serve_settings(model="/some/checkpoint").model_id == "gpt2"
    monkeypatch.setenv("PROMPTFLEET_MODEL_ID", "my-model")
    assert serve_settings(model="smollm2-135m").model_id == "my-model"

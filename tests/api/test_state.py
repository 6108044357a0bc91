"""The app builds its engine from the settings when none is passed (as `promptfleet serve`)."""
from __future__ import annotations

from promptfleet.testing.api_app import api_settings, running_api


def test_engine_is_built_from_the_settings(tmp_path, small_checkpoint):
    settings = api_settings(tmp_path / "data", small_checkpoint, max_step_tokens=64, linear_kernels="torch",
                            attention="sdpa", max_batch_size=7)
    with running_api(settings) as api:
        engine = api.engine
        assert (engine.config.max_step_tokens, engine.model.linear_kernels) == (64, "torch")
        assert engine.attention_backend == "sdpa"
        assert engine.scheduler.max_batch_size == 7
        r = api.client.post("/v1/completions", json={"model": "gpt2", "prompt": "Hi", "max_tokens": 3,
                                                     "temperature": 0}, headers=api.new_tenant()[1])
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text

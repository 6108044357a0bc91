"""Engine-test fixtures: PEFT adapters made by PEFT itself, and a running engine."""
from __future__ import annotations

from pathlib import Path

import pytest

from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.testing import make_peft_adapter, peft_greedy




@pytest.fixture(scope="session")
def peft_adapters(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    specs = {"pt_a": ("prompt_tuning", 7, 1), "pt_b": ("prompt_tuning", 3, 2),
             "ptune": ("p_tuning", 5, 3), "prefix": ("prefix_tuning", 6, 4)}
    return {name: make_peft_adapter(small_checkpoint, root / name, m, n, s) for name, (m, n, s) in specs.items()}




@pytest.fixture(scope="session")
def peft_reference():
    """``peft_reference(checkpoint, adapter_dir | None, prompt_ids, max_new_tokens)``."""
    return peft_greedy


@pytest.fixture
def small_engine(small_checkpoint: Path):
    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(max_batch_size=16))
    yield engine
    engine.stop()

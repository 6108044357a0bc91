"""Shared fixtures: seeded random GPT-2 checkpoints saved in Hugging Face format."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from promptfleet.platform.random_checkpoint import make_random_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, d=64; weights scaled up so greedy decoding has clear winners."""
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny-gpt2"), shape="tiny", seed=1234, scale=8.0)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers, d=128: big enough for a meaningful mixed-batch test, small enough for CI."""
    return make_random_checkpoint(tmp_path_factory.mktemp("small-gpt2"), shape="small-test", seed=99, scale=6.0)

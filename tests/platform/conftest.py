"""Engine-test fixtures: PEFT adapters made by PEFT itself, and a running engine."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import (PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model)
from transformers import GPT2LMHeadModel

from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine


def make_peft_adapter(checkpoint: Path, out: Path, method: str, n_virtual: int, seed: int) -> Path:
    """Build a PEFT adapter of ``method`` with seeded non-trivial weights and save it."""
    torch.manual_seed(seed)
    base = GPT2LMHeadModel.from_pretrained(checkpoint)
    if method == "prompt_tuning":
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual)
    elif method == "p_tuning":
        cfg = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual, encoder_hidden_size=64)
    elif method == "prefix_tuning":
        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual)
    else:
        raise ValueError(method)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def peft_adapters(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    specs = {"pt_a": ("prompt_tuning", 7, 1), "pt_b": ("prompt_tuning", 3, 2),
             "ptune": ("p_tuning", 5, 3), "prefix": ("prefix_tuning", 6, 4)}
    return {name: make_peft_adapter(small_checkpoint, root / name, m, n, s) for name, (m, n, s) in specs.items()}


def peft_greedy(checkpoint: Path, adapter_dir: Path | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The reference: PEFT (or plain transformers) generate on this request alone.

    ``use_cache=False``: with transformers 5.24 + peft 0.21, PeftModel.generate's cached
    path re-prepends the soft prompt at every decode step for PROMPT_TUNING/P_TUNING
    (seen by hooking wpe: 7 virtual + 1 real token fed per step), so its tokens diverge
    from PeftModel's own forward after the first one. Without the cache, generate runs
    PEFT's forward on the whole sequence each step: the definition of prompt tuning.
    """
    base = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    model = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=50256, eos_token_id=50256, use_cache=False)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="session")
def peft_reference():
    """``peft_reference(checkpoint, adapter_dir | None, prompt_ids, max_new_tokens)``."""
    return peft_greedy


@pytest.fixture
def small_engine(small_checkpoint: Path):
    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(max_batch_size=16))
    yield engine
    engine.stop()

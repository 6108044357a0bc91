"""Seeded random GPT-2 checkpoints in Hugging Face format, for tests, benchmarks and the
demo (no real GPT-2 weights are reachable here). ``scale`` multiplies the random weights
so logits are not flat and greedy decoding does not flip on near-ties."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from promptfleet.platform.tokenizer import load_tokenizer

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"n_layer": 2, "n_head": 4, "n_embd": 64},
    "small-test": {"n_layer": 4, "n_head": 4, "n_embd": 128},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768},
    "distilgpt2": {"n_layer": 6, "n_head": 12, "n_embd": 768},
    "gpt2-medium": {"n_layer": 24, "n_head": 16, "n_embd": 1024},
    "gpt2-large": {"n_layer": 36, "n_head": 20, "n_embd": 1280},
    "gpt2-xl": {"n_layer": 48, "n_head": 25, "n_embd": 1600},
}


def make_random_checkpoint(path: str | Path, *, shape: str = "tiny", seed: int = 0, scale: float = 1.0,
                           n_positions: int = 1024) -> Path:
    """Write config.json, model.safetensors and the GPT-2 tokenizer files to ``path``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = GPT2Config(**SHAPES[shape], n_positions=n_positions, vocab_size=50257,
                     bos_token_id=50256, eos_token_id=50256)
    model = GPT2LMHeadModel(cfg)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() >= 2:
                    param.mul_(scale)
    model.save_pretrained(path, safe_serialization=True)
    load_tokenizer(None).save_pretrained(path)
    (path / "RANDOM_WEIGHTS.txt").write_text(
        f"Seeded random GPT-2 ({shape}, seed={seed}, scale={scale}). Not a trained model.\n")
    return path

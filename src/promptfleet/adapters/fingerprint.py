"""Which backbone an adapter was made for: a stable string from the model's shape."""
from __future__ import annotations

from promptfleet.platform.config import ModelConfig


def model_fingerprint(cfg: ModelConfig) -> str:
    """E.g. ``gpt2-L12-H12-D768-V50257-P1024`` for GPT-2 small."""
    return f"gpt2-L{cfg.n_layer}-H{cfg.n_head}-D{cfg.n_embd}-V{cfg.vocab_size}-P{cfg.n_positions}"

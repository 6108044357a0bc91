"""Which backbone an adapter was made for: a stable string from the model's shape."""
from __future__ import annotations

from promptfleet.platform.config import ModelConfig


def model_fingerprint(cfg: ModelConfig) -> str:
    """E.g. ``gpt2-L12-H12-D768-V50257-P1024`` for GPT-2 small (unchanged, so stored GPT-2
    fingerprints stay valid); ``llama-L30-H9-KV3-D576-V49152-P8192`` for SmolLM2-135M: the
    family and the KV heads too, so a Llama of GPT-2's dimensions never matches it."""
    shape = f"L{cfg.n_layer}-H{cfg.n_head}"
    if cfg.family != "gpt2":
        shape += f"-KV{cfg.n_kv_head}"
    return f"{cfg.family}-{shape}-D{cfg.n_embd}-V{cfg.vocab_size}-P{cfg.n_positions}"

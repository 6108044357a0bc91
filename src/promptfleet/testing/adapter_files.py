"""PEFT-shaped adapters built by hand (no PEFT call), for tests that need exact or
hostile values: a PROMPT_TUNING ``adapter_config.json`` dict and its safetensors bytes."""
from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from promptfleet.platform.config import ModelConfig


def prompt_tuning_files(cfg: ModelConfig, *, n: int = 4, seed: int = 0, width: int | None = None,
                        values: torch.Tensor | None = None, **overrides: Any) -> tuple[dict, bytes]:
    """A PROMPT_TUNING adapter for ``cfg``: (config dict, safetensors bytes); ``values``
    replaces the seeded random soft prompt, ``overrides`` any config field."""
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": n,
              "token_dim": cfg.n_embd, "num_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
              "num_transformer_submodules": 1, "inference_mode": True, "prompt_tuning_init": "RANDOM"}
    config.update(overrides)
    emb = values if values is not None else torch.randn(n, width or cfg.n_embd,
                                                        generator=torch.Generator().manual_seed(seed))
    return config, save_safetensors({"prompt_embeddings": emb.contiguous()})

"""Seeded random checkpoints in Hugging Face format, for tests, benchmarks and the demo
(no real GPT-2 weights are reachable here): GPT-2 (``make_random_checkpoint``) and the
Llama family (``make_random_llama_checkpoint``: Llama or Qwen2, any head grouping, tied or
not, RoPE scaling). ``scale`` multiplies the random weights so logits are not flat and
greedy decoding does not flip on near-ties."""
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


LLAMA_SHAPES: dict[str, dict[str, int]] = {
    "llama-tiny": {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "hidden_size": 64, "intermediate_size": 128},
    "llama-small-test": {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                         "hidden_size": 128, "intermediate_size": 256},
    "smollm2-135m": {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "hidden_size": 576, "intermediate_size": 1536},
}


def make_random_llama_checkpoint(path: str | Path, *, shape: str = "llama-tiny", seed: int = 0, scale: float = 1.0,
                                 model_type: str = "llama", max_position_embeddings: int = 1024,
                                 **overrides) -> Path:
    """Write a seeded random Llama-family checkpoint (config.json, model.safetensors and
    the GPT-2 BPE tokenizer, vocabulary 50257) to ``path``. ``model_type`` is ``llama`` or
    ``qwen2``; ``overrides`` go to the transformers config (``num_key_value_heads``,
    ``tie_word_embeddings``, ``attention_bias``, ``rope_parameters``, ...)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in LLAMA_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(LLAMA_SHAPES)}")
    if model_type not in ("llama", "qwen2"):
        raise ValueError(f"model_type must be llama or qwen2, got {model_type!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    fields = {**LLAMA_SHAPES[shape], "vocab_size": 50257, "max_position_embeddings": max_position_embeddings,
              "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True, **overrides}
    cfg = AutoConfig.for_model(model_type, **fields)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # RMSNorm weights start at 1: make them matter too
                param.add_(torch.randn_like(param) * 0.1)
            elif param.dim() >= 2 and scale != 1.0:
                param.mul_(scale)
            elif name.endswith(".bias"):  # zero-initialised: give them values a test can see
                param.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    load_tokenizer(None).save_pretrained(path)
    (path / "RANDOM_WEIGHTS.txt").write_text(
        f"Seeded random {model_type} ({shape}, seed={seed}, scale={scale}). Not a trained model.\n")
    return path

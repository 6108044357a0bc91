"""Plain dataclass configs for the engine (no settings module, no I/O beyond config.json)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

_SUPPORTED_ACTIVATIONS = {"gelu_new", "gelu", "gelu_pytorch_tanh", "relu", "gelu_fast"}


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a GPT-2-family backbone (gpt2, -medium, -large, -xl, distilgpt2)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    eos_token_id: int = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        """Parameters that do matmul work per token (blocks + tied LM head)."""
        d = self.n_embd
        block = 12 * d * d + 13 * d
        return self.n_layer * block + self.vocab_size * d

    @classmethod
    def from_hf_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"unsupported model_type {model_type!r}: only GPT-2-family checkpoints load")
        act = raw.get("activation_function", "gelu_new")
        if act not in _SUPPORTED_ACTIVATIONS:
            raise ValueError(f"unsupported activation_function {act!r}")
        if raw.get("scale_attn_by_inverse_layer_idx") or raw.get("reorder_and_upcast_attn"):
            raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
        if raw.get("scale_attn_weights") is False:
            raise ValueError("scale_attn_weights=False is not supported")
        n_embd = int(raw.get("n_embd", raw.get("hidden_size", 768)))
        n_head = int(raw.get("n_head", raw.get("num_attention_heads", 12)))
        if n_embd % n_head:
            raise ValueError(f"n_embd {n_embd} is not divisible by n_head {n_head}")
        eos = raw.get("eos_token_id", 50256)
        return cls(
            n_layer=int(raw.get("n_layer", raw.get("num_hidden_layers", 12))),
            n_head=n_head,
            n_embd=n_embd,
            n_positions=int(raw.get("n_positions", raw.get("max_position_embeddings", 1024))),
            vocab_size=int(raw.get("vocab_size", 50257)),
            layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
            activation_function=act,
            eos_token_id=int(eos if eos is not None else 50256),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        return cls.from_hf_dict(json.loads((Path(path) / "config.json").read_text()))


def resolve_dtype(device: str, dtype: str | torch.dtype | None) -> torch.dtype:
    """fp16 (default) or bf16 on CUDA; fp32 (default) or bf16 on CPU."""
    on_cuda = torch.device(device).type == "cuda"
    if dtype is None:
        return torch.float16 if on_cuda else torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
        dtype = names[dtype]
    if not on_cuda and dtype == torch.float16:
        raise ValueError("float16 is only supported on CUDA; use float32 or bfloat16 on CPU")
    return dtype


@dataclass(frozen=True)
class RepetitionConfig:
    """Cut a generation whose tail is one n-gram repeated: ``min_repeats`` copies of an
    n-gram of 1..``max_ngram`` tokens covering at least ``min_span`` tokens."""

    enabled: bool = True
    max_ngram: int = 16
    min_repeats: int = 4
    min_span: int = 32


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    dtype: str | None = None
    max_batch_size: int = 64          # running sequences (KV slots)
    kv_cache_bytes: int = 2 << 30     # admission budget for reserved KV tokens
    max_queue: int = 512              # waiting requests before refusing
    max_model_len: int | None = None  # default: the backbone's n_positions
    max_step_tokens: int = 512        # tokens per forward: decode rows + prompt chunks (chunked prefill)
    attention: str = "auto"           # auto | sdpa | flash | avx512 (see kv_cache.resolve_attention)
    linear_kernels: str = "auto"      # auto | avx512 | onednn | torch (see linear_kernels.py)
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    num_threads: int | None = None    # torch intra-op threads on CPU

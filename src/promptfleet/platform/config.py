"""Plain dataclass configs for the engine (no settings module, no I/O beyond config.json)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

_SUPPORTED_ACTIVATIONS = {"gelu_new", "gelu", "gelu_pytorch_tanh", "relu", "gelu_fast"}
FAMILIES = ("gpt2", "llama")
# Hugging Face model types our Llama module serves (same block: RMSNorm, RoPE, SwiGLU, GQA)
LLAMA_MODEL_TYPES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``linear`` divides every frequency by ``factor``; ``llama3``
    (Llama 3.1+) divides the low frequencies by ``factor``, keeps the high ones and blends
    in between (``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``)."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_hf_dict(cls, raw: dict | None) -> "RopeScaling | None":
        if not raw:
            return None
        rope_type = raw.get("rope_type", raw.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")
        if raw.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor is not supported")
        if rope_type == "default":
            return None
        if rope_type == "llama3":
            missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                       if k not in raw]
            if missing:
                raise ValueError(f"llama3 rope scaling lacks {', '.join(missing)}")
            return cls("llama3", float(raw["factor"]), float(raw["low_freq_factor"]), float(raw["high_freq_factor"]),
                       int(raw["original_max_position_embeddings"]))
        return cls("linear", float(raw["factor"]))


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a backbone. ``family`` picks the module: ``gpt2`` (gpt2, -medium,
    -large, -xl, distilgpt2; ``model.GPT2``) or ``llama`` (Llama, SmolLM, Qwen2, Mistral
    without sliding window; ``llama.Llama``). GPT-2 checkpoints leave the Llama fields at
    their defaults; ``n_kv_head`` defaults to ``n_head`` (no grouped-query attention)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_positions: int = 1024
    vocab_size: int = 50257
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    eos_token_id: int = 50256
    family: str = "gpt2"
    # --- Llama family ---
    n_kv_head: int | None = None          # key/value heads (grouped-query attention when < n_head)
    intermediate_size: int | None = None  # MLP width (GPT-2: 4 * n_embd)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = True
    attention_bias: bool = False          # q/k/v projections carry a bias (Qwen2, some Llamas)
    attention_out_bias: bool = False      # the output projection too (Llama's attention_bias)
    mlp_bias: bool = False
    explicit_head_dim: int | None = None  # a checkpoint's head_dim when it is not n_embd // n_head
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()   # every end-of-sequence id (eos_token_id is the first)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; use one of {', '.join(FAMILIES)}")
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.n_embd)
        if not self.eos_token_ids:
            object.__setattr__(self, "eos_token_ids", (self.eos_token_id,))
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.family == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError("GPT-2 has no grouped-query attention (n_kv_head must equal n_head)")

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        """Width of one token's keys (or values) in one layer: ``n_kv_head * head_dim``."""
        return self.n_kv_head * self.head_dim

    @property
    def n_params(self) -> int:
        """Parameters that do matmul work per token (blocks + LM head)."""
        d = self.n_embd
        if self.family == "gpt2":
            block = 12 * d * d + 13 * d
            return self.n_layer * block + self.vocab_size * d
        q = self.n_head * self.head_dim
        attn = d * (q + 2 * self.kv_dim) + q * d
        block = attn + 3 * d * self.intermediate_size + 2 * d
        return self.n_layer * block + self.vocab_size * d

    @classmethod
    def from_hf_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type", "gpt2")
        if model_type in LLAMA_MODEL_TYPES:
            return cls._llama_from_hf_dict(raw)
        if model_type != "gpt2":
            raise ValueError(f"unsupported model_type {model_type!r}: GPT-2-family checkpoints and "
                             f"{', '.join(LLAMA_MODEL_TYPES)} load")
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
    def _llama_from_hf_dict(cls, raw: dict) -> "ModelConfig":
        """A Llama / SmolLM / Qwen2 / Mistral ``config.json`` (transformers 4's ``rope_theta`` +
        ``rope_scaling`` or transformers 5's ``rope_parameters``)."""
        model_type = raw["model_type"]
        required = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
        missing = [k for k in required if raw.get(k) is None]
        if missing:
            raise ValueError(f"model_type {model_type!r} config lacks {', '.join(missing)}")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} for model_type {model_type!r} (only silu)")
        n_positions = int(raw.get("max_position_embeddings", 2048))
        window = raw.get("sliding_window")
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            window = None
        if window is not None and int(window) < n_positions:
            raise ValueError(f"sliding-window attention ({window} < {n_positions} positions) is not supported")
        rope = raw.get("rope_parameters") or {}
        legacy = raw.get("rope_scaling")
        scaling = RopeScaling.from_hf_dict(legacy if legacy else rope)
        theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        bias = bool(raw.get("attention_bias", False))
        n_embd, n_head = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = raw.get("head_dim")
        if head_dim is None and n_embd % n_head:
            raise ValueError(f"hidden_size {n_embd} is not divisible by num_attention_heads {n_head}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        return cls(
            family="llama",
            n_layer=int(raw["num_hidden_layers"]),
            n_head=n_head,
            n_kv_head=int(raw.get("num_key_value_heads") or n_head),
            n_embd=n_embd,
            n_positions=n_positions,
            vocab_size=int(raw["vocab_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),  # transformers' default
            attention_bias=True if model_type == "qwen2" else bias,
            attention_out_bias=False if model_type == "qwen2" else bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            explicit_head_dim=int(head_dim) if head_dim is not None and int(head_dim) != n_embd // n_head else None,
            bos_token_id=None if raw.get("bos_token_id") is None else int(raw["bos_token_id"]),
            eos_token_id=eos_ids[0] if eos_ids else 0,
            eos_token_ids=eos_ids,
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
    attention: str = "auto"           # auto | sdpa | flash | flex | avx512 (see attention_backend)
    decode_graphs: str = "auto"       # auto (CUDA graphs on CUDA with flash/flex) | off | eager (see decode_graphs)
    linear_kernels: str = "auto"      # auto | avx512 | onednn | torch (see linear_kernels.py)
    repetition: RepetitionConfig = field(default_factory=RepetitionConfig)
    num_threads: int | None = None    # torch intra-op threads on CPU

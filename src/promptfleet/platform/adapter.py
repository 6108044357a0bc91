"""PEFT prompt-learning adapters as shared KV prefixes.

PEFT saves ``prompt_embeddings`` in ``adapter_model.safetensors``: ``[n, d_model]`` for
PROMPT_TUNING and P_TUNING (the prompt encoder already applied), ``[n, n_layer*2*d_model]``
for PREFIX_TUNING (projection already applied). Virtual tokens come first and attention
is causal, so their keys/values never depend on the request: we compute them once per
adapter and every request of that adapter copies them into its KV slot (no prefill).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes

from promptfleet.platform.config import ModelConfig
from promptfleet.platform.model import GPT2, DenseCache

PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
MAX_VIRTUAL_TOKENS = 512


class AdapterError(ValueError):
    """An adapter that cannot be served; the message says why."""


@dataclass(frozen=True)
class AdapterWeights:
    peft_type: str
    num_virtual_tokens: int
    prompt_embeddings: torch.Tensor  # float32, [n, d] or [n, n_layer*2*d]
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterPrefix:
    """Per-layer keys and values of an adapter's virtual tokens: ``[n_layer, H, n, D]``."""

    key: str
    peft_type: str
    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_virtual_tokens(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def parse_adapter(config: dict, tensors: dict[str, torch.Tensor]) -> AdapterWeights:
    """Check a PEFT adapter's config and tensors (format only; shapes come later)."""
    if not isinstance(config, dict):
        raise AdapterError("adapter_config.json must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterError(f"unsupported peft_type {peft_type!r}; supported: {', '.join(PEFT_TYPES)}")
    task_type = config.get("task_type")
    if task_type != "CAUSAL_LM":
        raise AdapterError(f"unsupported task_type {task_type!r}; only CAUSAL_LM adapters are served")
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise AdapterError("num_transformer_submodules must be 1 for a decoder-only model")
    n = config.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_VIRTUAL_TOKENS:
        raise AdapterError(f"num_virtual_tokens must be an integer in 1..{MAX_VIRTUAL_TOKENS}, got {n!r}")
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"adapter_model.safetensors must hold exactly 'prompt_embeddings', found {sorted(tensors)}")
    emb = tensors["prompt_embeddings"]
    if not emb.is_floating_point():
        raise AdapterError(f"prompt_embeddings must be floating point, got {emb.dtype}")
    if emb.dim() != 2 or emb.shape[0] != n:
        raise AdapterError(f"prompt_embeddings has shape {list(emb.shape)}; expected [{n}, dim] "
                           f"for num_virtual_tokens={n}")
    emb = emb.float()
    if not torch.isfinite(emb).all():
        raise AdapterError("prompt_embeddings contains NaN or Inf values")
    return AdapterWeights(peft_type=peft_type, num_virtual_tokens=n, prompt_embeddings=emb, config=dict(config))


def parse_adapter_files(config_bytes: bytes, safetensors_bytes: bytes) -> AdapterWeights:
    """Parse the two files of a PEFT ``save_pretrained`` directory (never unpickles)."""
    try:
        config = json.loads(config_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter_config.json is not valid JSON: {exc}") from exc
    try:
        tensors = load_safetensors_bytes(safetensors_bytes)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise AdapterError(f"adapter_model.safetensors is not a valid safetensors file: {exc}") from exc
    return parse_adapter(config, tensors)


def load_adapter_dir(path: str | Path) -> AdapterWeights:
    path = Path(path)
    if (path / "adapter_model.bin").exists() and not (path / "adapter_model.safetensors").exists():
        raise AdapterError("adapter_model.bin (pickle) is refused; save the adapter with safetensors")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            raise AdapterError(f"{name} is missing from {path}")
    return parse_adapter_files((path / "adapter_config.json").read_bytes(),
                               (path / "adapter_model.safetensors").read_bytes())


def expected_dim(peft_type: str, cfg: ModelConfig) -> int:
    return cfg.n_layer * 2 * cfg.n_embd if peft_type == "PREFIX_TUNING" else cfg.n_embd


def check_fits(weights: AdapterWeights, cfg: ModelConfig) -> None:
    """Refuse an adapter whose shapes do not fit this backbone."""
    dim = expected_dim(weights.peft_type, cfg)
    got = weights.prompt_embeddings.shape[1]
    if got != dim:
        detail = f"n_layer*2*n_embd = {cfg.n_layer}*2*{cfg.n_embd}" if weights.peft_type == "PREFIX_TUNING" \
            else f"n_embd = {cfg.n_embd}"
        raise AdapterError(f"{weights.peft_type} prompt_embeddings width {got} does not fit this backbone "
                           f"(expected {detail} = {dim})")
    for key, want in (("token_dim", cfg.n_embd), ("num_layers", cfg.n_layer), ("num_attention_heads", cfg.n_head)):
        have = weights.config.get(key)
        if have is not None and have != want:
            raise AdapterError(f"adapter_config {key}={have} does not match the backbone ({want})")
    if weights.num_virtual_tokens >= cfg.n_positions:
        raise AdapterError(f"num_virtual_tokens {weights.num_virtual_tokens} leaves no room in "
                           f"{cfg.n_positions} positions")


@torch.inference_mode()
def build_prefix(model: GPT2, weights: AdapterWeights, key: str) -> AdapterPrefix:
    """Compute an adapter's shared KV prefix on the model's device and dtype."""
    cfg = model.config
    check_fits(weights, cfg)
    param = model.wte.weight
    emb = weights.prompt_embeddings.to(device=param.device)
    n = weights.num_virtual_tokens
    h, d = cfg.n_head, cfg.head_dim
    if weights.peft_type == "PREFIX_TUNING":
        kv = emb.to(param.dtype).view(n, cfg.n_layer * 2, h, d).permute(1, 2, 0, 3)
        k, v = kv[0::2].contiguous(), kv[1::2].contiguous()
    else:
        cache = DenseCache(cfg.n_layer)
        positions = torch.arange(n, device=param.device)[None]
        model(None, positions, cache, inputs_embeds=emb[None].to(param.dtype))
        k = torch.stack([t[0] for t in cache.k]).contiguous()
        v = torch.stack([t[0] for t in cache.v]).contiguous()
    return AdapterPrefix(key=key, peft_type=weights.peft_type, k=k, v=v)

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
from torch import nn

from promptfleet.platform.config import ModelConfig
from promptfleet.platform.model import GPT2, DenseCache

PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING")
MAX_VIRTUAL_TOKENS = 512
# An adapter's values may be at most this many times the backbone's own scale: its largest
# token-embedding value for a soft prompt, the largest key/value it computes on real tokens
# for a KV prefix. Trained adapters sit far below it (PEFT's random init of a soft prompt is
# ~40x a small random GPT-2's embeddings); values that overflow a layer norm, attention
# scores or the fp16 range sit far above.
ADAPTER_SCALE_LIMIT = 1000.0
_REFERENCE_TOKENS = 64  # real tokens run through the backbone to measure its key/value scale


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


@dataclass(frozen=True)
class BackboneScale:
    """What an adapter's values are measured against (``backbone_scale``)."""

    embedding: float  # largest |value| in the token-embedding matrix
    kv: float         # largest |key| or |value| over every layer, on real tokens
    dtype: torch.dtype


@torch.inference_mode()
def backbone_scale(model: nn.Module) -> BackboneScale:
    """Measure ``model``: its embedding table, and one forward over tokens spread across
    the vocabulary (a few ms; the engine measures once and keeps it)."""
    cfg, param = model.config, model.wte.weight
    n = min(_REFERENCE_TOKENS, cfg.n_positions)
    ids = torch.linspace(0, cfg.vocab_size - 1, n, device=param.device).long()[None]
    cache = DenseCache(cfg.n_layer)
    model(ids, torch.arange(n, device=param.device)[None], cache)
    kv = max(float(t.abs().max()) for t in (*cache.k, *cache.v))
    return BackboneScale(embedding=float(param.abs().max()), kv=kv, dtype=param.dtype)


def _check_scale(what: str, values: torch.Tensor, reference: float, ref_name: str, dtype: torch.dtype) -> None:
    """Refuse ``values`` that are not finite in the serving ``dtype`` or exceed
    ``ADAPTER_SCALE_LIMIT`` x ``reference``; the message names the tensor and the bound."""
    if not bool(torch.isfinite(values.to(dtype)).all()):
        top = float(values.abs().max()) if bool(torch.isfinite(values).all()) else float("nan")
        raise AdapterError(f"{what} is not finite in the serving dtype {str(dtype).removeprefix('torch.')} "
                           f"(largest |value| {top:.3g}, the dtype's max {torch.finfo(dtype).max:.3g})")
    top = float(values.abs().max())
    if top > ADAPTER_SCALE_LIMIT * reference:
        raise AdapterError(f"{what} has values up to {top:.3g}, over {ADAPTER_SCALE_LIMIT:g} x the backbone's "
                           f"{ref_name} ({reference:.3g}); such an adapter would overflow the model")


def check_values(weights: AdapterWeights, scale: BackboneScale) -> None:
    """An adapter's own numbers against the backbone's scale, before anything runs them."""
    prefix = weights.peft_type == "PREFIX_TUNING"
    _check_scale(f"{weights.peft_type} prompt_embeddings", weights.prompt_embeddings,
                 scale.kv if prefix else scale.embedding,
                 "largest key/value on real tokens" if prefix else "largest token-embedding value", scale.dtype)


def check_prefix(prefix: "AdapterPrefix", scale: BackboneScale) -> None:
    """A built prefix's keys and values, in the serving dtype, against the backbone's own."""
    for name, t in (("keys", prefix.k), ("values", prefix.v)):
        _check_scale(f"the KV prefix's {name}", t, scale.kv, "largest key/value on real tokens", scale.dtype)


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
    """``prompt_embeddings`` width: the model width for a soft prompt; for a prefix, every
    layer's keys and values over the KV heads (PEFT sizes prefixes by ``num_key_value_heads``
    under grouped-query attention; GPT-2's KV width is its model width)."""
    return cfg.n_layer * 2 * cfg.kv_dim if peft_type == "PREFIX_TUNING" else cfg.n_embd


def expected_peft_config(peft_type: str, cfg: ModelConfig) -> dict[str, int]:
    """What PEFT writes into ``adapter_config.json`` for this backbone: a prefix counts the
    KV heads and their width (``peft.utils.other._prepare_prompt_learning_config``)."""
    if peft_type == "PREFIX_TUNING":
        return {"token_dim": cfg.kv_dim, "num_layers": cfg.n_layer, "num_attention_heads": cfg.n_kv_head}
    return {"token_dim": cfg.n_embd, "num_layers": cfg.n_layer, "num_attention_heads": cfg.n_head}


def check_fits(weights: AdapterWeights, cfg: ModelConfig) -> None:
    """Refuse an adapter whose shapes do not fit this backbone."""
    dim = expected_dim(weights.peft_type, cfg)
    got = weights.prompt_embeddings.shape[1]
    if got != dim:
        detail = f"n_layer*2*n_kv_head*head_dim = {cfg.n_layer}*2*{cfg.n_kv_head}*{cfg.head_dim}" \
            if weights.peft_type == "PREFIX_TUNING" else f"n_embd = {cfg.n_embd}"
        raise AdapterError(f"{weights.peft_type} prompt_embeddings width {got} does not fit this backbone "
                           f"(expected {detail} = {dim})")
    for key, want in expected_peft_config(weights.peft_type, cfg).items():
        have = weights.config.get(key)
        if have is not None and have != want:
            raise AdapterError(f"adapter_config {key}={have} does not match the backbone ({want})")
    if weights.num_virtual_tokens >= cfg.n_positions:
        raise AdapterError(f"num_virtual_tokens {weights.num_virtual_tokens} leaves no room in "
                           f"{cfg.n_positions} positions")


@torch.inference_mode()
def build_prefix(model: GPT2, weights: AdapterWeights, key: str, scale: BackboneScale | None = None) -> AdapterPrefix:
    """Compute an adapter's shared KV prefix on the model's device and dtype, refusing
    (``AdapterError``) one that does not fit or whose values or built keys/values are not
    finite or exceed ``ADAPTER_SCALE_LIMIT`` x the backbone's (``scale``: measured here
    when not given)."""
    cfg = model.config
    check_fits(weights, cfg)
    scale = scale or backbone_scale(model)
    check_values(weights, scale)
    param = model.wte.weight
    emb = weights.prompt_embeddings.to(device=param.device)
    n = weights.num_virtual_tokens
    h, d = cfg.n_kv_head, cfg.head_dim
    if weights.peft_type == "PREFIX_TUNING":  # keys as PEFT passes them: cached, never rotated
        kv = emb.to(param.dtype).view(n, cfg.n_layer * 2, h, d).permute(1, 2, 0, 3)
        k, v = kv[0::2].contiguous(), kv[1::2].contiguous()
    else:
        cache = DenseCache(cfg.n_layer)
        positions = torch.arange(n, device=param.device)[None]
        model(None, positions, cache, inputs_embeds=emb[None].to(param.dtype))
        k = torch.stack([t[0] for t in cache.k]).contiguous()
        v = torch.stack([t[0] for t in cache.v]).contiguous()
    prefix = AdapterPrefix(key=key, peft_type=weights.peft_type, k=k, v=v)
    check_prefix(prefix, scale)
    return prefix

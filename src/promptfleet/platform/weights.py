"""Loading Hugging Face GPT-2 checkpoints into our ``GPT2`` module.

A checkpoint is a directory with ``config.json`` and ``model.safetensors`` (sharded
safetensors with an index file also load), or a hub id when the hub is reachable.
HF's ``Conv1D`` stores weights as ``[in, out]``; ``nn.Linear`` wants ``[out, in]``, so
those are transposed here. Pickled ``pytorch_model.bin`` files are never loaded.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from promptfleet.platform.config import ModelConfig
from promptfleet.platform.linear_kernels import pack_linears
from promptfleet.platform.model import GPT2

log = logging.getLogger(__name__)

# our name -> (HF name inside a block, transpose?)
_BLOCK_MAP = {
    "ln_1.weight": ("ln_1.weight", False), "ln_1.bias": ("ln_1.bias", False),
    "c_attn.weight": ("attn.c_attn.weight", True), "c_attn.bias": ("attn.c_attn.bias", False),
    "attn_proj.weight": ("attn.c_proj.weight", True), "attn_proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False), "ln_2.bias": ("ln_2.bias", False),
    "c_fc.weight": ("mlp.c_fc.weight", True), "c_fc.bias": ("mlp.c_fc.bias", False),
    "mlp_proj.weight": ("mlp.c_proj.weight", True), "mlp_proj.bias": ("mlp.c_proj.bias", False),
}


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local directory as is; otherwise try the hub (only works where it is reachable)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on it
        raise FileNotFoundError(f"{name_or_path!r} is not a directory") from exc
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as exc:
        raise FileNotFoundError(
            f"{name_or_path!r} is not a checkpoint directory and could not be fetched from the hub: {exc}"
        ) from exc


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    single = path / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    raise FileNotFoundError(f"no model.safetensors in {path} (pickled .bin checkpoints are not loaded)")


def weights_id(path: str | Path) -> str:
    """sha256 of the checkpoint's safetensors bytes: what a stored KV prefix depends on."""
    import hashlib

    path = Path(path)
    files = [path / "model.safetensors"] if (path / "model.safetensors").exists() else sorted(
        path.glob("model-*.safetensors"))
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        out[key[len("transformer."):] if key.startswith("transformer.") else key] = value
    return out


def load_gpt2(name_or_path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
              linear_kernels: str = "auto") -> GPT2:
    """Our ``GPT2`` on ``device``/``dtype``; ``linear_kernels`` as in ``linear_kernels.pack_linears``."""
    path = resolve_checkpoint(name_or_path)
    cfg = ModelConfig.from_pretrained(path)
    state = _strip_prefix(read_state_dict(path))
    ours: dict[str, torch.Tensor] = {
        "wte.weight": state["wte.weight"], "wpe.weight": state["wpe.weight"],
        "ln_f.weight": state["ln_f.weight"], "ln_f.bias": state["ln_f.bias"],
    }
    for i in range(cfg.n_layer):
        for our_name, (hf_name, transpose) in _BLOCK_MAP.items():
            key = f"h.{i}.{hf_name}"
            if key not in state:
                raise ValueError(f"checkpoint {path} lacks {key}")
            tensor = state[key]
            ours[f"blocks.{i}.{our_name}"] = tensor.t().contiguous() if transpose else tensor
    with torch.device("meta"):
        model = GPT2(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in ours.items()}, strict=True, assign=True)
    model = model.to(device=device).eval().requires_grad_(False)
    kernels = pack_linears(model, linear_kernels)
    log.info("loaded GPT-2 %s: %d layers, d=%d, %s on %s, %s linears", path, cfg.n_layer, cfg.n_embd, dtype,
             device, kernels)
    return model

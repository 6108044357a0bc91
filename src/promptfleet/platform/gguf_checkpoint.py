"""Llama-family checkpoints from GGUF files (llama.cpp's format), dequantized to float32
with the ``gguf`` package (``pip install -e '.[demo]'``, or ``pip install gguf``).

``read_gguf`` returns what a Hugging Face checkpoint directory would hold: a
``config.json``-style dict and a state dict under transformers' parameter names, so the
one Llama loader in ``weights.py`` serves both. llama.cpp's converter stores the q and k
projections of ``llama`` models with each head's rows interleaved for its own RoPE
convention (``convert_hf_to_gguf.py``'s ``permute``); that is undone here, as transformers'
``LlamaTensorProcessor`` does. Qwen2 files are stored unpermuted.
"""
from __future__ import annotations

import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "qwen2")

# GGUF metadata key (after "<arch>.") -> transformers config key
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

# GGUF tensor name inside a block -> transformers name inside ``model.layers.<i>.``
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _import_gguf():
    try:
        import gguf
    except ImportError as exc:
        raise ImportError("loading a .gguf checkpoint needs the gguf package: pip install -e '.[demo]' "
                          "(or pip install gguf)") from exc
    return gguf


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy/torch order (GGUF lists dimensions innermost first)
    ggml_type: int
    offset: int             # from the start of the data section


@dataclass
class GGUFHeader:
    """A GGUF file's metadata and tensor table (values of ``metadata`` are Python scalars,
    strings or lists; the tensor data stays on disk)."""

    path: Path
    metadata: dict[str, object]
    tensors: list[GGUFTensorInfo]
    data_start: int

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)


# metadata value types: fixed-size scalars; 8 is a string, 9 an array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


class _Cursor:
    def __init__(self, data: bytes | mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def scalar(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        text = bytes(self.data[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return text

    def value(self, kind: int):
        if kind == 8:
            return self.string()
        if kind == 9:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _SCALARS and item_kind != 7:  # a numeric array in one read
                fmt = _SCALARS[item_kind]
                values = np.frombuffer(self.data, dtype=np.dtype(fmt), count=count, offset=self.pos).tolist()
                self.pos += count * struct.calcsize(fmt)
                return values
            return [self.value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF metadata value type {kind}")
        return self.scalar(_SCALARS[kind])


def read_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF (v2/v3) file's metadata and tensor table with ``struct`` (the ``gguf``
    package's reader builds a numpy view per token of the vocabulary: seconds for this)."""
    path = Path(path)
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cur = _Cursor(data)
        if bytes(data[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        cur.pos = 4
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.scalar("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            ggml_type, offset = cur.scalar("<I"), cur.scalar("<Q")
            tensors.append(GGUFTensorInfo(name, tuple(reversed(dims)), ggml_type, offset))
        align = int(metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
    return GGUFHeader(path, metadata, tensors, data_start)


def _tensor_bytes(gguf, info: GGUFTensorInfo) -> tuple[int, tuple[int, ...]]:
    """``(byte count, raw array shape)`` of a tensor as stored (rows of quantized blocks)."""
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(info.ggml_type)]
    *outer, inner = info.shape
    if inner % block:
        raise ValueError(f"tensor {info.name}: {inner} columns are not whole blocks of {block}")
    row = inner // block * type_size
    return row * int(np.prod(outer, dtype=np.int64)), (*outer, row)


def _hf_name(gguf_name: str) -> str | None:
    """transformers' parameter name for a GGUF tensor name (None: not one we load)."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _TOP_TENSORS:
        return f"{_TOP_TENSORS[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{_BLOCK_TENSORS[parts[2]]}.{kind}"
    return None


def unpermute_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows ``(pair, 2)`` back to ``(2, pair)``
    (the halves layout transformers' ``rotate_half`` expects). Works on weights and biases."""
    pair = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, pair, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_config(header: GGUFHeader) -> dict:
    """A transformers-style ``config.json`` dict from a GGUF file's metadata."""
    arch = header.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    name = header.get("general.name", header.path.name)
    scaling = header.get(f"{arch}.rope.scaling.type")
    if (scaling not in (None, "none")) or any(t.name == "rope_freqs.weight" for t in header.tensors):
        raise ValueError(f"GGUF {name!r} uses RoPE scaling ({scaling or 'rope_freqs'}), which the GGUF loader "
                         "does not read yet; load the Hugging Face safetensors checkpoint instead")
    raw: dict = {"model_type": arch, "hidden_act": "silu"}
    for key, hf_key in _CONFIG_KEYS.items():
        value = header.get(f"{arch}.{key}")
        if value is not None:
            raw[hf_key] = value
    if "vocab_size" not in raw:
        raw["vocab_size"] = len(header.get("tokenizer.ggml.tokens", []))
    head_dim = header.get(f"{arch}.rope.dimension_count")
    if head_dim is not None and head_dim != raw["hidden_size"] // raw["num_attention_heads"]:
        raise ValueError(f"GGUF rope.dimension_count {head_dim} differs from the head size: partial RoPE is "
                         "not supported")
    names = {t.name for t in header.tensors}
    raw["tie_word_embeddings"] = "output.weight" not in names
    raw["attention_bias"] = "blk.0.attn_q.bias" in names
    for key in ("bos_token_id", "eos_token_id"):
        value = header.get(f"tokenizer.ggml.{key}")
        if value is not None:
            raw[key] = int(value)
    return raw


def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, float32 state dict under transformers' names)`` of a GGUF file."""
    gguf = _import_gguf()
    header = read_header(path)
    raw = gguf_config(header)
    permuted = raw["model_type"] == "llama"
    heads = {"q_proj": raw["num_attention_heads"],
             "k_proj": raw.get("num_key_value_heads", raw["num_attention_heads"])}
    blob = np.memmap(header.path, dtype=np.uint8, mode="r")
    state: dict[str, torch.Tensor] = {}
    for info in header.tensors:
        name = _hf_name(info.name)
        if name is None:
            raise ValueError(f"unexpected tensor {info.name!r} in {path}")
        nbytes, raw_shape = _tensor_bytes(gguf, info)
        start = header.data_start + info.offset
        weight = gguf.dequantize(blob[start:start + nbytes].reshape(raw_shape), info.ggml_type)
        if tuple(weight.shape) != info.shape:
            raise ValueError(f"tensor {info.name}: dequantized to {weight.shape}, expected {info.shape}")
        proj = name.rsplit(".", 2)[-2]
        if permuted and proj in heads:
            weight = unpermute_rope_rows(weight, heads[proj])
        state[name] = torch.from_numpy(np.array(weight, dtype=np.float32))  # a writable copy off the map
    log.info("read %s: %s, %d tensors dequantized to float32", path, raw["model_type"], len(state))
    return raw, state


def read_gguf_config(path: str | Path) -> dict:
    """Only the config (the metadata; tensor data is not read)."""
    return gguf_config(read_header(path))

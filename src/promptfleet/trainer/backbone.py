"""The backbone a job trains on, as a transformers module PEFT can wrap, and its tokenizer.

Any checkpoint the server serves: a Hugging Face directory (``AutoModelForCausalLM``; GPT-2
or the Llama family), a ``.gguf`` file, or a bundled name such as ``smollm2-135m``. A GGUF
is read with the platform's own ``read_gguf`` (a transformers-style config dict and a
float32 state dict under transformers' names) and mapped onto ``LlamaConfig``/``Qwen2Config``
here, so no transformers GGUF path is involved. Dequantizing takes seconds, so the state
dicts of the last ``CACHE_SIZE`` GGUF files are kept per process; each job gets a fresh
module built on the meta device around those (frozen, shared, never written) tensors, so
nothing one job does to its module reaches the next. The tokenizer is the one serving
uses for that checkpoint (``platform.tokenizer.load_tokenizer``), also cached.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CACHE_SIZE = 2
_lock = threading.Lock()
_gguf_states: OrderedDict[tuple[str, int, int], tuple[dict, dict[str, torch.Tensor]]] = OrderedDict()
_tokenizers: OrderedDict[tuple[str, int, int], Any] = OrderedDict()


def _key(path: Path) -> tuple[str, int, int]:
    """Path plus size and mtime (a directory: its files' total size and newest mtime), so a
    checkpoint rewritten in place is read again."""
    stats = [f.stat() for f in path.iterdir() if f.is_file()] if path.is_dir() else [path.stat()]
    return (str(path.resolve()), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0))


def _cached(cache: OrderedDict, key: tuple[str, int, int], make: Any) -> Any:
    with _lock:
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    value = make()  # outside the lock: seconds of work; two racing threads just both read it
    with _lock:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > CACHE_SIZE:
            cache.popitem(last=False)
    return value


def clear_cache() -> None:
    with _lock:
        _gguf_states.clear()
        _tokenizers.clear()


def resolve(model_path: str | Path) -> Path:
    from promptfleet.platform.weights import resolve_checkpoint

    return Path(resolve_checkpoint(model_path))


def _gguf_state(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from promptfleet.platform.gguf_checkpoint import read_gguf

    def read() -> tuple[dict, dict[str, torch.Tensor]]:
        raw, state = read_gguf(path)
        for tensor in state.values():
            tensor.requires_grad_(False)
        return raw, state

    return _cached(_gguf_states, _key(path), read)


def hf_config(raw: dict) -> Any:
    """A transformers config (``LlamaConfig``, ``Qwen2Config``) from ``read_gguf``'s dict."""
    from transformers import AutoConfig

    fields = dict(raw)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def _module_from_state(raw: dict, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The transformers module around ``state``'s tensors, built on the meta device (no
    random initialisation of weights that are replaced at once)."""
    from transformers import AutoModelForCausalLM

    config = hf_config(raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(state, strict=False, assign=True)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
        raise ValueError(f"GGUF state does not fit {type(model).__name__}: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # computed, non-persistent buffers (RoPE inverse frequencies) were built on meta: build them again
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, type(module)(config=config))
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ValueError(f"tensors left uninitialised after loading the GGUF state: {meta[:5]}")
    return model


def load_backbone(model_path: str | Path, *, device: str = "cpu") -> torch.nn.Module:
    """A fresh float32 transformers causal-LM module for ``model_path``, frozen, in eval mode."""
    path = resolve(model_path)
    from promptfleet.platform.weights import is_gguf

    if is_gguf(path):
        raw, state = _gguf_state(path)
        model = _module_from_state(raw, state)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.requires_grad_(False).eval()
    return model.to(device)


def load_tokenizer(model_path: str | Path) -> Any:
    """The tokenizer serving uses for this checkpoint (cached per process)."""
    from promptfleet.platform.tokenizer import load_tokenizer as platform_tokenizer

    path = resolve(model_path)
    return _cached(_tokenizers, _key(path), lambda: platform_tokenizer(path))


def eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    return int(eos)

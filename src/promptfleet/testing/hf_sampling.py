"""transformers' own top-k / top-p warpers, applied as ``generate`` applies them (top-k,
then top-p; 0 and 1.0 are off): the reference the samplers are tested against."""
from __future__ import annotations

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper


def hf_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` (``[1, vocab]``) filtered by transformers' warpers (a copy; the input is kept)."""
    out = logits.clone()
    if top_k:
        out = TopKLogitsWarper(top_k=top_k)(None, out)
    if top_p < 1.0:
        out = TopPLogitsWarper(top_p=top_p)(None, out)
    return out

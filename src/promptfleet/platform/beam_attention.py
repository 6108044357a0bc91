"""Attention for the decode rows of one beam-search request, over a prompt the beams share.

The beams of a request never copy the prompt's keys and values: those sit once, at
positions ``0 .. shared-1`` of the head beam's KV slot (the adapter's virtual tokens
first, as for any request), and every beam reads them there. Each beam's own generated
tokens sit at positions ``shared ..`` of its own slot (``platform.beam_group`` copies a
parent's own tokens when a beam forks, never the prompt's).

A row's attention is one softmax over both parts (cascade attention): the scores of its
query against the shared keys (one matmul for all beams: the prompt is read once per
step, not once per beam) and against its own keys are joined before the softmax, so the
result is exactly attention over the concatenated sequence. Computed in float32 whatever
the cache's dtype, on the cache's device (these rows are few: the beams of one request).
"""
from __future__ import annotations

import math

import torch

from promptfleet.platform.kv_cache import SlotKVCache


class BeamBatch:
    """Rows ``b = 0 .. B-1`` in KV slots ``slots[b]``, each bringing one token at position
    ``start`` (all beams of a request have the same length); the shared prompt is
    positions ``0 .. shared-1`` of slot ``head``."""

    native_lens = None  # never on the native decode kernel (runner: no replay for this group)
    T = 1

    def __init__(self, cache: SlotKVCache, *, head: int, slots: list[int], shared: int, start: int) -> None:
        if not 0 < shared <= start:
            raise ValueError(f"a beam's new token (position {start}) must follow the shared prompt ({shared})")
        self.cache, self.head, self.shared, self.start, self.B = cache, head, shared, start, len(slots)
        dev = cache.k[0].device
        self.slots = torch.tensor(slots, dtype=torch.long, device=dev)
        self.flat_index = self.slots * cache.k[0].shape[1] + start
        for slot in slots:
            cache.mark_written(slot, shared, start + 1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q`` ``[B, 1, H, D]``, ``k``/``v`` ``[B, 1, H_kv, D]`` -> ``[B, 1, H, D]``."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        rows, heads, dim = q.shape[0], q.shape[2], q.shape[3]
        kv_heads = k.shape[2]
        width = kv_heads * dim
        kc.view(-1, width).index_copy_(0, self.flat_index, k.reshape(rows, width))
        vc.view(-1, width).index_copy_(0, self.flat_index, v.reshape(rows, width))
        end = self.start + 1
        shared_k, shared_v = kc[self.head, : self.shared].float(), vc[self.head, : self.shared].float()  # [P, Hkv, D]
        own_k, own_v = kc[self.slots, self.shared:end].float(), vc[self.slots, self.shared:end].float()  # [B, t, Hkv, D]
        # grouped-query attention: the query heads of KV head n are n*G .. n*G+G-1
        qg = q.reshape(rows, kv_heads, heads // kv_heads, dim).float() * (1.0 / math.sqrt(dim))
        scores = torch.cat((torch.einsum("bngd,pnd->bngp", qg, shared_k),
                            torch.einsum("bngd,btnd->bngt", qg, own_k)), dim=-1)
        weights = torch.softmax(scores, dim=-1)
        out = (torch.einsum("bngp,pnd->bngd", weights[..., : self.shared], shared_v)
               + torch.einsum("bngt,btnd->bngd", weights[..., self.shared:], own_v))
        return out.reshape(rows, 1, heads, dim).to(q.dtype)

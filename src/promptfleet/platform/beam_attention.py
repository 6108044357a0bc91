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
        # (index_select after the slice: advanced indexing with the slice is ~3x slower)
        own_k = kc[:, self.shared:end].index_select(0, self.slots).float()  # [B, t, Hkv, D]
        own_v = vc[:, self.shared:end].index_select(0, self.slots).float()
        # grouped-query attention: the query heads of KV head n are n*G .. n*G+G-1
        group = heads // kv_heads
        qg = q.reshape(rows, kv_heads, group, dim).float() * (1.0 / math.sqrt(dim))  # [B, Hkv, G, D]
        q_shared = qg.permute(1, 0, 2, 3).reshape(kv_heads, rows * group, dim)    # all beams' queries per KV head
        scores_shared = torch.matmul(q_shared, shared_k.permute(1, 2, 0))          # [Hkv, B*G, P]
        scores_own = torch.matmul(qg, own_k.permute(0, 2, 3, 1))                   # [B, Hkv, G, t]
        scores = torch.cat((scores_shared.reshape(kv_heads, rows, group, -1).permute(1, 0, 2, 3), scores_own), -1)
        weights = torch.softmax(scores, dim=-1)
        w_shared = weights[..., : self.shared].permute(1, 0, 2, 3).reshape(kv_heads, rows * group, self.shared)
        out_shared = torch.matmul(w_shared, shared_v.permute(1, 0, 2)).reshape(kv_heads, rows, group, dim)
        out = out_shared.permute(1, 0, 2, 3) + torch.matmul(weights[..., self.shared:], own_v.permute(0, 2, 1, 3))
        return out.reshape(rows, 1, heads, dim).to(q.dtype)

"""Decode-only steps as CUDA graphs, one per batch-size bucket (prompt steps stay eager).

A decode step of B rows (in slots 0..B-1: the running batch is compact) is run as the
graph of the smallest bucket P >= B (``bucket_for``) over static buffers: token ids and
positions, the B real rows first, then P - B copies of the last one. Row r uses slot r,
so the padded rows work in the free slots B..P-1: they write their keys there, read
whatever those slots hold, and their outputs are dropped; those slots are then marked
never written (``SlotKVCache.forget``), so the next sequence there zeroes what it reads.
(A padded row must not share the copied row's slot: its attention over other keys would
give other keys and values for the next layer, written over the real row's.) Everything
a row needs is derived inside the graph from its position (a decode row at position p has
p cached keys and writes its own at p), so a replay reads only these buffers: one small
device-to-device copy each, then ``graph.replay()``, whatever the batch's lengths. The attention inside is
the backend's ragged decode (``RaggedDecode``): flash-attn's ``flash_attn_with_kvcache``
(lengths and slots as int32 tensors) or FlexAttention's block mask built from the lengths
with tensor operations, both capturable; SDPA over each slot's full length (masked) is the
reference used off CUDA.

Capture runs only on CUDA (``CudaGraph``: a warm-up on a side stream, which also compiles
FlexAttention, then ``torch.cuda.graph`` in one memory pool shared by every bucket).
``EagerGraph`` runs the same static-buffer forward again at each replay: it is what the CPU
tests drive, so the buckets, the static buffers, the padded rows and the fallback are
tested where no GPU is. A bucket whose capture fails logs why once and runs eagerly
(``ModelRunner`` falls back to the module path).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from promptfleet.platform.kv_cache import SlotKVCache

log = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bucket_for(rows: int, max_rows: int, buckets: tuple[int, ...] = GRAPH_BUCKETS) -> int | None:
    """The padded batch size a decode step of ``rows`` rows runs at: the smallest bucket
    that holds it, at most ``max_rows`` (the cache's slots); None when rows exceed both."""
    if rows < 1 or rows > max_rows:
        return None
    for bucket in buckets:
        if bucket >= rows:
            return min(bucket, max_rows)
    return None


class RaggedDecode:
    """Attention of one new token per row over its slot's cached keys, lengths as tensors
    (static shapes, nothing read back): the body of a captured decode step."""

    def __init__(self, cache: SlotKVCache, positions: torch.Tensor, slots: torch.Tensor) -> None:
        # positions [P] (long): row r's token sits at positions[r] of slot slots[r]
        self.cache = cache
        self.positions, self.slots = positions, slots
        stride = cache.k[0].shape[1]
        self.flat = slots * stride + positions           # where each row's keys go
        self.lens = (positions + 1).to(torch.int32)      # keys each row attends to
        if cache.backend == "flash":
            self.seqlens32, self.slots32 = positions.to(torch.int32), slots.to(torch.int32)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        kc, vc = c.k[layer], c.v[layer]
        _, rows, heads, dim = q.shape
        kv_heads = k.shape[2]
        if c.backend == "flash":
            from flash_attn import flash_attn_with_kvcache

            out = flash_attn_with_kvcache(q.view(rows, 1, heads, dim), kc, vc, k=k.view(rows, 1, kv_heads, dim),
                                          v=v.view(rows, 1, kv_heads, dim), cache_seqlens=self.seqlens32,
                                          cache_batch_idx=self.slots32, causal=True)
            return out.view(1, rows, heads, dim)
        width = kv_heads * dim
        kc.view(-1, width).index_copy_(0, self.flat, k.reshape(rows, width))
        vc.view(-1, width).index_copy_(0, self.flat, v.reshape(rows, width))
        if c.flex is not None:
            return c.flex.decode(q.reshape(rows, heads, dim), kc, vc, 0, self.lens).view(1, rows, heads, dim)
        # SDPA over each row's whole slot, masked past its length (the reference off CUDA)
        keys, values = kc[:rows].transpose(1, 2), vc[:rows].transpose(1, 2)
        mask = torch.arange(keys.shape[2], device=q.device)[None, :] < self.lens[:, None]
        out = F.scaled_dot_product_attention(q.view(rows, 1, heads, dim).transpose(1, 2), keys, values,
                                             attn_mask=mask[:, None, None, :], scale=1.0 / math.sqrt(dim),
                                             enable_gqa=heads != kv_heads)
        return out.transpose(1, 2).reshape(1, rows, heads, dim)


class EagerGraph:
    """``CudaGraph``'s interface off CUDA: each replay runs the recorded function again."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool: object = None) -> None:
        self._fn = fn
        self.output = fn()

    def replay(self) -> None:
        self.output = self._fn()


class CudaGraph:
    """One decode step captured with ``torch.cuda.CUDAGraph`` (CUDA only)."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool: object = None) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles FlexAttention, sets up cuBLAS
            fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the API's threads may use the GPU meanwhile (adapter prefixes)
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):
            self.output = fn()
        self.graph.replay()  # capture records without running: run this step

    def replay(self) -> None:
        self.graph.replay()


@dataclass
class _Bucket:
    ids: torch.Tensor        # [1, P] long
    positions: torch.Tensor  # [1, P] long
    slots: torch.Tensor      # [P] long: 0..P-1, row r in slot r
    graph: EagerGraph | CudaGraph | None = None


class DecodeGraphs:
    """Decode-only steps over slots ``0..B-1`` run as per-bucket graphs (``run``)."""

    def __init__(self, model, cache: SlotKVCache, *, graph: type = CudaGraph) -> None:
        self.model, self.cache, self._graph = model, cache, graph
        self._buckets: dict[int, _Bucket | None] = {}  # None: capture failed, eager from now on
        self._pad_index: dict[tuple[int, int], torch.Tensor] = {}
        self._pool = torch.cuda.graph_pool_handle() if graph is CudaGraph else None
        self.replays = 0

    def _index(self, rows: int, padded: int, device: torch.device) -> torch.Tensor:
        """``[P]``: rows 0..B-1, then B-1 again for the padded rows (their ids and positions)."""
        key = (rows, padded)
        if key not in self._pad_index:
            self._pad_index[key] = torch.arange(padded, device=device).clamp_(max=rows - 1)
        return self._pad_index[key]

    def run(self, ids: torch.Tensor, positions: torch.Tensor, rows: int) -> torch.Tensor | None:
        """Hidden states after the final norm ``[1, rows, d]`` for a decode step whose rows
        sit in slots ``0..rows-1`` (ids/positions ``[1, rows]`` on the device), or None when
        this batch size runs eagerly."""
        padded = bucket_for(rows, self.cache.max_slots)
        if padded is None or self._buckets.get(padded, True) is None:
            return None
        dev = ids.device
        bucket = self._buckets.get(padded)
        if bucket is None:
            bucket = self._buckets[padded] = _Bucket(torch.zeros(1, padded, dtype=torch.long, device=dev),
                                                     torch.zeros(1, padded, dtype=torch.long, device=dev),
                                                     torch.arange(padded, device=dev))
        index = self._index(rows, padded, dev)
        bucket.ids.copy_(ids.index_select(1, index))
        bucket.positions.copy_(positions.index_select(1, index))
        if self.cache.flex is None and self.cache.backend != "flash":
            # masked SDPA over whole slots multiplies never-written values by 0: zero them once
            self.cache.ensure_initialized(0, rows, self.cache.max_len + 1)
        try:
            if bucket.graph is None:
                try:
                    bucket.graph = self._graph(lambda: self._forward(bucket), self._pool)
                except Exception as exc:  # noqa: BLE001 - any capture failure keeps the eager path
                    log.warning("decode steps of %d rows stay eager: capturing their graph failed: %s", padded, exc)
                    self._buckets[padded] = None
                    return None
                log.info("captured the decode step for %d rows (%s)", padded, type(bucket.graph).__name__)
            else:
                bucket.graph.replay()
        finally:
            for slot in range(rows, padded):  # the padded rows wrote there (see the module's docstring)
                self.cache.forget(slot)
        self.replays += 1
        return bucket.graph.output[:, :rows]

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        m = self.model
        ctx = RaggedDecode(self.cache, bucket.positions[0], bucket.slots)
        return m.final_norm(m.run_blocks(m.embed(bucket.ids, bucket.positions), bucket.positions, ctx))

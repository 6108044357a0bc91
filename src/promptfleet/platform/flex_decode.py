"""Decode attention over the ragged slot cache with FlexAttention: no source build.

Row ``b`` of a decode group (one new token each, its keys and values already written at
position ``lens[b] - 1`` of KV slot ``slot0 + b``) attends over positions ``0 .. lens[b]-1``
of its slot. The keys are read in place from the cache (``[slots, max_len, H_kv, D]``
viewed as ``[slots, H_kv, max_len, D]``: no gather, no copy), always over every slot and
its full length, so the compiled kernel sees ONE shape (a row outside the group gets no key
block and costs nothing; a batch-size-dependent shape would recompile, and on CPU inductor's
dynamic-shape flex kernels do not even build for some head sizes); a block mask built from
``lens`` with tensor operations alone (so it can be captured in a CUDA graph) skips the
blocks past each row's end, and the mask inside the last block hides the rest.

Never-written cache memory inside a row's last block is read (and masked): it must be
finite (``SlotKVCache.ensure_initialized`` zeroes it in whole blocks), since a masked NaN
value still poisons the sum.

FlexAttention is compiled by torch (Triton on CUDA, inductor's C++ on CPU) on first use,
once per process; grouped-query heads are shared in the kernel.
"""
from __future__ import annotations

import logging
import math
from typing import Callable

import torch

log = logging.getLogger(__name__)

FLEX_BLOCK = 128  # keys per block of the block mask (FlexAttention's default tile)


class FlexDecode:
    """``decode(q, kc, vc, slot0, lens)``: q ``[B, H, D]``, cache ``[slots, L, H_kv, D]``,
    ``lens`` ``[B]`` (int32, keys per row, this step's included) -> ``[B, H, D]``."""

    def __init__(self, block: int = FLEX_BLOCK) -> None:
        self.block = block
        self._compiled: Callable | None = None

    def _kernel(self) -> Callable:
        if self._compiled is None:
            from torch.nn.attention.flex_attention import flex_attention

            log.info("compiling FlexAttention's decode kernel (once per process)")
            self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def block_mask(self, lens: torch.Tensor, kv_len: int):
        """The blocks row b reads (``ceil(lens[b] / block)``) of ``kv_len`` keys, and the mask inside them."""
        from torch.nn.attention.flex_attention import BlockMask

        rows, blocks = lens.shape[0], -(-kv_len // self.block)
        lens = lens.to(torch.int32)
        num = ((lens + (self.block - 1)) // self.block).view(rows, 1, 1)
        index = torch.arange(blocks, dtype=torch.int32, device=lens.device).expand(rows, 1, 1, blocks)

        def inside(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

        return BlockMask.from_kv_blocks(num, index.contiguous(), BLOCK_SIZE=self.block, mask_mod=inside,
                                        seq_lengths=(1, kv_len), compute_q_blocks=False)  # forward only

    def decode(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slot0: int,
               lens: torch.Tensor) -> torch.Tensor:
        rows, heads, dim = q.shape
        slots = kc.shape[0]
        # always every slot as the batch (rows outside the group get no key block): one
        # shape per process, so the kernel compiles once and never for a new batch size
        q_all = q.new_zeros(slots, heads, dim)
        q_all[slot0:slot0 + rows] = q
        lens_all = torch.zeros(slots, dtype=torch.int32, device=q.device)
        lens_all[slot0:slot0 + rows] = lens
        keys, values = kc.transpose(1, 2), vc.transpose(1, 2)     # [slots, H_kv, L, D], strided views
        out = self._kernel()(q_all[:, :, None, :], keys, values, block_mask=self.block_mask(lens_all, keys.shape[2]),
                             scale=1.0 / math.sqrt(dim), enable_gqa=heads != keys.shape[1])
        return out[slot0:slot0 + rows, :, 0, :]

"""A decode step's blocks as a straight run of native kernel calls.

Why: at batch 32 the GPT-2-small forward on the native kernels spent ~2.9 ms of ~37
between the kernels (measured: forward time minus time inside the kernel calls), in
Python and torch dispatch: about 60 small operations a block (module calls, views,
checks, allocations). In place they cost about twice what the same operations cost timed
in a loop, plausibly because each 7-9 MB weight streaming through evicts the
interpreter's state from the caches. A decode-only step (one new
token per row, every row on the native attention path) needs none of that generality:
``NativeDecode`` allocates its buffers once per step and calls, per block, layer norm,
the fused-qkv GEMM, attention straight on the qkv rows, the output projection with the
residual fused, layer norm, the MLP GEMMs (activation and residual fused), in fp32 or
bf16. The arithmetic is the block path's, kernel for kernel, so the result is the same
bit for bit (tested); anything else (prompt chunks, mixed steps) takes the block path.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from promptfleet.platform.native_kernels import FUSED_ACTIVATIONS, NativeKernels
from promptfleet.platform.native_layers import NativeLinear, pad_rows


@dataclass(frozen=True)
class DecodePlan:
    """What a decode-only step's attention needs: rows ``slot0 ..`` of ``k``/``v`` (one
    ``[slots, positions, H, D]`` tensor per layer), row b attending to its first
    ``lens[b]`` positions after storing this step's token at ``lens[b] - 1``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    slot0: int
    lens: torch.Tensor  # int32 [B]


@dataclass(frozen=True)
class _Gemm:
    packed: int
    bias: int | None
    out_features: int
    in_features: int
    act: int

    @classmethod
    def of(cls, linear: NativeLinear) -> "_Gemm":
        return cls(linear.packed_weight.data_ptr(), None if linear.bias is None else linear.bias.data_ptr(),
                   linear.out_features, linear.in_features, FUSED_ACTIVATIONS.get(linear.fused, 0))


class NativeDecode:
    """Runs ``model.blocks`` for a decode-only step; ``None`` from ``for_model`` when the
    model's blocks are not all on native linears with fused activations."""

    def __init__(self, model, kernels: NativeKernels) -> None:
        self.kernels, self.blocks = kernels, model.blocks
        cfg = model.config
        self.d, self.heads, self.head_dim = cfg.n_embd, cfg.n_head, cfg.head_dim
        self.gemms = [tuple(_Gemm.of(lin) for lin in (b.c_attn, b.attn_proj, b.c_fc, b.mlp_proj)) for b in self.blocks]
        dtype = model.wte.weight.dtype
        self.dtype, self.elem = dtype, torch.empty(0, dtype=dtype).element_size()
        self.linear = kernels.function_for("pf_linear", dtype)

    @classmethod
    def for_model(cls, model, kernels: NativeKernels) -> "NativeDecode | None":
        ok = all(isinstance(lin, NativeLinear) for b in model.blocks
                 for lin in (b.c_attn, b.attn_proj, b.c_fc, b.mlp_proj))
        ok = ok and all(b.c_fc.act is None for b in model.blocks)  # the activation runs in the GEMM
        return cls(model, kernels) if ok else None

    def _gemm(self, g: _Gemm, a: torch.Tensor, out: torch.Tensor, residual: torch.Tensor | None, threads: int) -> None:
        self.linear(a.data_ptr(), a.shape[0], g.in_features, g.packed, g.out_features, g.bias, g.act,
                    None if residual is None else residual.data_ptr(), out.data_ptr(), threads)

    def __call__(self, x: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
        """``x``: ``[1, B, d]`` embeddings of the step's B tokens -> hidden states after the
        last block (before ``ln_f``)."""
        rows, d, h, hd = x.shape[1], self.d, self.heads, self.head_dim
        if x.dtype != self.dtype or plan.lens.shape != (rows,) or plan.lens.dtype != torch.int32:
            raise ValueError(f"bad native decode call: x {tuple(x.shape)} {x.dtype}, lens {tuple(plan.lens.shape)}")
        padded = self.kernels.padded_rows(rows)
        cur = pad_rows(x.reshape(rows, d), padded)  # a copy: the buffers below never alias x
        qkv = torch.empty(padded, 3 * d, dtype=self.dtype)
        att = torch.zeros(padded, d, dtype=self.dtype)  # rows past B stay zero: attention writes B rows
        mid = torch.empty(padded, d, dtype=self.dtype)
        mlp = torch.empty(padded, 4 * d, dtype=self.dtype)
        nxt = torch.empty(padded, d, dtype=self.dtype)
        threads, bf16 = torch.get_num_threads(), int(self.dtype == torch.bfloat16)
        positions = plan.k[0].shape[1]
        scale = 1.0 / math.sqrt(hd)
        q_ptr, lens_ptr = qkv.data_ptr(), plan.lens.data_ptr()
        attention = self.kernels.lib.pf_decode_attention
        for block, (g_qkv, g_proj, g_fc, g_out), k_cache, v_cache in zip(self.blocks, self.gemms, plan.k, plan.v):
            self._gemm(g_qkv, block.ln_1(cur).contiguous(), qkv, None, threads)
            rc = attention(q_ptr, k_cache.data_ptr(), v_cache.data_ptr(), positions * d, plan.slot0, lens_ptr,
                           q_ptr + d * self.elem, q_ptr + 2 * d * self.elem, 3 * d, rows, h, hd, positions, scale,
                           att.data_ptr(), bf16, threads)
            if rc != 0:
                raise ValueError(f"native attention refused lengths {plan.lens.tolist()} (cache holds {positions})")
            self._gemm(g_proj, att, mid, cur, threads)
            self._gemm(g_fc, block.ln_2(mid).contiguous(), mlp, None, threads)
            self._gemm(g_out, mlp, nxt, mid, threads)
            cur, nxt = nxt, cur
        return cur[:rows].reshape(1, rows, d)

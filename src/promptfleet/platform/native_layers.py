"""``nn.Module`` faces of the AVX-512 kernels (``native_kernels.py``) that ``pack_linears``
puts into our GPT-2 and Llama in place of torch's (CPU inference only; fp32, and bf16
linears where the CPU has AVX512-BF16):

- ``NativeLinear``: ``act(x @ W.T + b) + residual`` in one GEMM call; the tanh GELU or
  ReLU after ``c_fc`` and the residual add after each block's output projection run in the
  kernel's epilogue instead of as separate passes over the output. Llama's ``gate_up``
  takes ``silu_gate``: ``silu(gate) * up`` in one pass after the GEMM, while its output is
  still in cache.
- ``NativeLayerNorm``, ``NativeRMSNorm``: norms without torch's per-call dispatch, which at
  decode (``[batch, 768]``, 25 calls a step) costs more than the arithmetic.
- ``NativeRotary``: Llama's RoPE: one cos/sin table per step, then q and k rotated in
  place (one call when k follows q in the qkv output).
"""
from __future__ import annotations

import torch
from torch import nn

from promptfleet.platform.llama import RMSNorm, Rotary
from promptfleet.platform.model import activation_fn
from promptfleet.platform.native_kernels import FUSED_ACTIVATIONS, NativeKernels

SILU_GATE = "silu_gate"


def weight_and_bias(linear: nn.Linear | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An ``nn.Linear``'s weight and bias, or a bare weight (the tied LM head) and no bias."""
    if isinstance(linear, nn.Linear):
        return linear.weight, linear.bias
    return linear, None


def pad_rows(flat: torch.Tensor, rows: int) -> torch.Tensor:
    """``flat`` with zero rows appended up to ``rows``."""
    return torch.cat([flat, flat.new_zeros(rows - flat.shape[0], flat.shape[1])])


class NativeLinear(nn.Module):
    """``y = act(x @ W.T + b) [+ residual]`` through ``native_kernels`` (fp32 or bf16,
    inference only). Rows are padded to the kernel's row block (8). Activations the kernel has
    (``FUSED_ACTIVATIONS``: tanh GELU, ReLU) run in its epilogue; any other (erf GELU)
    runs after it in torch."""

    fuses_residual = True  # model.linear_plus passes the residual in

    def __init__(self, linear: nn.Linear | torch.Tensor, gemm: NativeKernels, *, activation: str | None = None,
                 out: torch.Tensor | None = None) -> None:
        super().__init__()
        weight, bias = weight_and_bias(linear)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.gemm, self.activation = gemm, activation
        self.fused = activation if activation in FUSED_ACTIVATIONS else None
        self.gate = activation == SILU_GATE  # out_features/2 wide: silu(first half) * second half
        self.act = activation_fn(activation) if activation and not (self.fused or self.gate) else None
        with torch.no_grad():
            self.packed_weight = gemm.pack(weight, out)
        self.bias = None if bias is None else bias.detach().contiguous().clone()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features)
        if residual is not None and self.gate:
            raise ValueError("a residual add after the SiLU gate is not supported")
        res = None if residual is None else residual.reshape(rows, self.out_features)
        padded = self.gemm.padded_rows(rows)
        if padded != rows:
            flat = pad_rows(flat, padded)
            res = None if res is None else pad_rows(res, padded)
        out = self.gemm.linear(flat, self.packed_weight, self.out_features, self.bias,
                               activation=self.fused, residual=res)
        if self.gate:
            out = self.gemm.silu_gate(out)
        if padded != rows:
            out = out[:rows]
        if self.act is not None:
            if residual is not None:
                raise ValueError("a residual add after an unfused activation is not supported")
            out = self.act(out)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, activation={self.activation}"


class NativeLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dimension on the native kernel; shares the original
    module's parameters (nothing is copied)."""

    def __init__(self, norm: nn.LayerNorm, kernels: NativeKernels) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1:
            raise ValueError(f"native layer norm normalises one dimension, not {tuple(norm.normalized_shape)}")
        self.kernels, self.eps = kernels, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0] if self.weight is not None else '?'}, eps={self.eps}"


class NativeRMSNorm(nn.Module):
    """``llama.RMSNorm`` on the native kernel; shares the original module's weight."""

    def __init__(self, norm: RMSNorm, kernels: NativeKernels) -> None:
        super().__init__()
        self.kernels, self.eps, self.weight = kernels, norm.eps, norm.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)


class NativeRope:
    """One step's rotation on the native kernel: rotates q and k in place, returns them."""

    def __init__(self, kernels: NativeKernels, cos: torch.Tensor, sin: torch.Tensor) -> None:
        self.kernels, self.cos, self.sin = kernels, cos, sin

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, heads, d = q.shape
        kv_heads, rows = k.shape[2], b * t
        if (k.data_ptr() == q.data_ptr() + heads * d * q.element_size() and q.stride() == k.stride()
                and q.stride(2) == d and q.stride(0) == t * q.stride(1)):
            # k follows q within each row of the qkv output: both in one call
            self.kernels.rope(q.as_strided((rows, heads + kv_heads, d), (q.stride(1), d, 1)), self.cos, self.sin)
        else:
            for x, n in ((q, heads), (k, kv_heads)):
                try:
                    self.kernels.rope(x.view(rows, n, d), self.cos, self.sin)
                except RuntimeError:  # not viewable as rows of heads: rotate a copy, write it back
                    tmp = x.reshape(rows, n, d).contiguous()
                    self.kernels.rope(tmp, self.cos, self.sin)
                    x.copy_(tmp.view_as(x))
        return q, k


class NativeRotary(nn.Module):
    """``llama.Rotary`` on the native kernels: the step's cos/sin table in one call."""

    def __init__(self, rotary: Rotary, kernels: NativeKernels) -> None:
        super().__init__()
        self.kernels = kernels
        self.inv_freq = rotary.inv_freq.detach().float().contiguous().clone()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> NativeRope:
        return NativeRope(self.kernels, *self.kernels.rope_table(positions.reshape(-1), self.inv_freq))

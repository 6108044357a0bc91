"""``nn.Module`` faces of the AVX-512 kernels (``native_kernels.py``) that ``pack_linears``
puts into our GPT-2 in place of torch's (CPU inference only; fp32, and bf16 linears where
the CPU has AVX512-BF16):

- ``NativeLinear``: ``act(x @ W.T + b) + residual`` in one GEMM call; the tanh GELU or
  ReLU after ``c_fc`` and the residual add after each block's output projection run in the
  kernel's epilogue instead of as separate passes over the output.
- ``NativeLayerNorm``: layer norm without torch's per-call dispatch, which at decode
  (``[batch, 768]``, 25 calls a step) costs more than the arithmetic.
"""
from __future__ import annotations

import torch
from torch import nn

from promptfleet.platform.model import activation_fn
from promptfleet.platform.native_kernels import FUSED_ACTIVATIONS, NativeKernels


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
        self.act = activation_fn(activation) if activation and not self.fused else None
        with torch.no_grad():
            self.packed_weight = gemm.pack(weight, out)
        self.bias = None if bias is None else bias.detach().contiguous().clone()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features)
        res = None if residual is None else residual.reshape(rows, self.out_features)
        padded = self.gemm.padded_rows(rows)
        if padded != rows:
            flat = pad_rows(flat, padded)
            res = None if res is None else pad_rows(res, padded)
        out = self.gemm.linear(flat, self.packed_weight, self.out_features, self.bias,
                               activation=self.fused, residual=res)
        if padded != rows:
            out = out[:rows]
        if self.act is not None:
            if residual is not None:
                raise ValueError("a residual add after an unfused activation is not supported")
            out = self.act(out)
        return out.reshape(*x.shape[:-1], self.out_features)

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

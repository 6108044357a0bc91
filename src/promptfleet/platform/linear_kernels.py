"""Inference linears on packed weights (CPU): our AVX-512 kernel, or oneDNN.

``avx512`` (``native_kernels.py``; fp32, and bf16 on CPUs with AVX512-BF16) is the
fastest at decode, because it keeps the weight stream going while it computes (see the C
file). PyTorch's CPU ``F.linear`` calls MKL's sgemm, which on AMD CPUs runs its AVX2 code
path; oneDNN (shipped inside torch) JITs AVX-512 kernels for whatever CPU it finds, on
weights packed once into its blocked layout (the same fp32 arithmetic, max |diff| ~1e-4).
The measurements behind this order: README, Benchmarks: "Figures behind the kernel choices". The MLP's GELU is fused into the packed ``c_fc``.

``pack_linears(model)`` swaps every block's ``nn.Linear`` for a ``PackedLinear``
(oneDNN) or a ``NativeLinear`` (``native_layers.py``; with ``avx512`` GPT-2's layer norms
become ``NativeLayerNorm`` too, and a Llama's RMSNorms, RoPE and SiLU gate run on the
native kernels) and gives the model a packed copy of the tied LM head; ``kernels="torch"``
keeps plain PyTorch (and is what every non-CPU device gets). ``auto`` takes ``avx512``
where it builds for the dtype, else ``onednn`` (fp32, bf16), else ``torch``, for both
families.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from promptfleet.platform.llama import Llama
from promptfleet.platform.model import GPT2
from promptfleet.platform.native_kernels import huge_page_empty, kernel_support, native_kernels
from promptfleet.platform.native_layers import (SILU_GATE, NativeLayerNorm, NativeLinear, NativeRMSNorm, NativeRotary,
                                                pad_rows, weight_and_bias)

log = logging.getLogger(__name__)

KERNELS = ("auto", "avx512", "onednn", "torch")
# oneDNN picks its blocking from the expected rows; 32 is the decode batch we tune for
# and stays within a few percent of the best packing from 8 to 1024 rows.
PACK_ROWS_HINT = 32
# oneDNN JIT-compiles (~1 ms) and caches a primitive per input shape, and RSS grows with
# every new one (measured: +258 MB over 399 distinct row counts of one 3072x768 weight).
# A step's row count varies with the batch and the prompts packed into it, so rows are
# padded up to a few buckets and long inputs run in chunks of MAX_ROWS: a bounded set of
# shapes per weight (``row_buckets``), compiled once by ``warm_up``.
MAX_ROWS = 256


def bucket_rows(rows: int) -> int:
    """Rows padded up to a multiple of 8 (<= 64), 16 (<= 128) or 32 (<= MAX_ROWS). At
    small row counts a linear is bound by reading its weight, so a few padded rows cost
    little; from 64 rows on the padding is under 1/4 of the rows."""
    step = 8 if rows <= 64 else 16 if rows <= 128 else 32
    return -(-rows // step) * step


def row_buckets() -> list[int]:
    return sorted({bucket_rows(r) for r in range(1, MAX_ROWS + 1)})


def onednn_linear_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (
        device.type == "cpu"
        and dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def resolve_kernels(kernels: str, device: torch.device, dtype: torch.dtype, family: str = "gpt2") -> str:
    """``auto`` -> ``avx512`` where it builds and runs for the dtype (CPU; fp32, bf16 with
    AVX512-BF16), else ``onednn`` where that is available, else ``torch``. Asking for one
    that cannot run here is an error that says why."""
    if kernels not in KERNELS:
        raise ValueError(f"unknown linear kernels {kernels!r}; use one of {', '.join(KERNELS)}")
    if kernels in ("auto", "avx512"):
        reason = kernel_support(device, dtype).reason
        if reason is None:
            return "avx512"
        if kernels == "avx512":
            raise ValueError(f"the avx512 linear kernel cannot run here: {reason}")
    available = onednn_linear_available(device, dtype)
    if kernels == "onednn" and not available:
        raise ValueError(f"oneDNN linears need a CPU tensor in float32 or bfloat16 (got {device.type}, {dtype})")
    if kernels == "auto":
        return "onednn" if available else "torch"
    return kernels


# our activation names -> oneDNN post-op (attr, algorithm)
_FUSABLE = {
    "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu_fast": ("gelu", "tanh"),
    "gelu": ("gelu", "none"), "relu": ("relu", ""),
}


class PackedLinear(nn.Module):
    """``y = act(x @ W.T + b)`` on a oneDNN-packed ``W`` (inference only)."""

    def __init__(self, linear: nn.Linear | torch.Tensor, *, activation: str | None = None) -> None:
        super().__init__()
        weight, bias = weight_and_bias(linear)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.activation = activation
        self.attr, self.algorithm = _FUSABLE[activation] if activation else ("none", "")
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS_HINT)
        # plain attributes, not parameters: an opaque oneDNN tensor has no storage to
        # save, move or hash, and nothing trains these
        self.packed_weight = packed
        self.bias = None if bias is None else bias.detach().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        flat = x.reshape(rows, self.in_features)
        if rows <= MAX_ROWS:
            out = self._run(flat)
        else:
            out = torch.empty(rows, self.out_features, dtype=x.dtype, device=x.device)
            for start in range(0, rows, MAX_ROWS):
                out[start:start + MAX_ROWS] = self._run(flat[start:start + MAX_ROWS])
        return out.reshape(*x.shape[:-1], self.out_features)

    def _run(self, flat: torch.Tensor) -> torch.Tensor:
        rows = flat.shape[0]
        padded = bucket_rows(rows)
        if padded != rows:
            flat = pad_rows(flat, padded)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight, self.bias, self.attr, [], self.algorithm)
        return out[:rows]

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile this weight's primitive for every row bucket now, not under load."""
        x = torch.zeros(MAX_ROWS, self.in_features, dtype=self.packed_weight.dtype)
        for rows in row_buckets():
            self._run(x[:rows])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, fused={self.activation}"


def pack_linears(model: GPT2 | Llama, kernels: str = "auto") -> str:
    """Switch ``model`` (our ``GPT2`` or ``Llama``) to packed linears in place; returns the
    kernels used."""
    weight = model.wte.weight
    chosen = resolve_kernels(kernels, weight.device, weight.dtype, model.config.family)
    if model.linear_kernels != "torch":
        return model.linear_kernels  # already packed (packing is one-way)
    if chosen == "torch":
        return "torch"
    if isinstance(model, Llama):
        return _pack_llama_native(model) if chosen == "avx512" else _pack_llama_onednn(model)
    act = model.config.activation_function
    if chosen == "avx512":
        gemm = native_kernels()
        # every packed weight in one huge-page arena, in the order a forward reads them
        shapes = [lin.weight.shape for b in model.blocks for lin in (b.c_attn, b.attn_proj, b.c_fc, b.mlp_proj)]
        sizes = [gemm.packed_numel(*shape) for shape in [*shapes, weight.shape]]
        slices = iter(huge_page_empty(sum(sizes), weight.dtype).split(sizes))

        def wrap(linear: nn.Linear | torch.Tensor, activation: str | None = None) -> nn.Module:
            return NativeLinear(linear, gemm, activation=activation, out=next(slices))
    else:
        def wrap(linear: nn.Linear | torch.Tensor, activation: str | None = None) -> nn.Module:
            return PackedLinear(linear, activation=activation)
    for block in model.blocks:
        block.c_attn = wrap(block.c_attn)
        block.attn_proj = wrap(block.attn_proj)
        block.c_fc = wrap(block.c_fc, act)
        block.fused_activation = True
        block.mlp_proj = wrap(block.mlp_proj)
    model.lm_head = wrap(weight)  # a packed copy; wte itself still serves lookups
    if chosen == "avx512":
        for block in model.blocks:
            block.ln_1, block.ln_2 = NativeLayerNorm(block.ln_1, gemm), NativeLayerNorm(block.ln_2, gemm)
        model.ln_f = NativeLayerNorm(model.ln_f, gemm)
    model.linear_kernels = chosen
    if chosen == "onednn":
        # blocks share their four weight shapes: warming one block's linears compiles them all
        for layer in (model.blocks[0].c_attn, model.blocks[0].attn_proj, model.blocks[0].c_fc,
                      model.blocks[0].mlp_proj, model.lm_head):
            layer.warm_up()
    log.info("linears packed for %s (%d blocks + LM head)", chosen, len(model.blocks))
    return chosen


def _pack_llama_native(model: Llama) -> str:
    """Native-kernel copies of a Llama's linears (SiLU gate after gate_up), norms and RoPE."""
    gemm = native_kernels()
    head = model.wte.weight if model.lm_head is None else model.lm_head.weight
    linears = [(b, name) for b in model.blocks for name in ("qkv", "o_proj", "gate_up", "down")]
    sizes = [gemm.packed_numel(*getattr(b, name).weight.shape) for b, name in linears] + [
        gemm.packed_numel(*head.shape)]
    slices = iter(huge_page_empty(sum(sizes), head.dtype).split(sizes))  # in the order a forward reads them
    for block, name in linears:
        activation = SILU_GATE if name == "gate_up" else None
        setattr(block, name, NativeLinear(getattr(block, name), gemm, activation=activation, out=next(slices)))
    for block in model.blocks:
        block.fused_gate = True
        block.attn_norm, block.mlp_norm = NativeRMSNorm(block.attn_norm, gemm), NativeRMSNorm(block.mlp_norm, gemm)
    model.norm = NativeRMSNorm(model.norm, gemm)
    model.rotary = NativeRotary(model.rotary, gemm)
    model.lm_head = NativeLinear(model.wte.weight if model.lm_head is None else model.lm_head, gemm, out=next(slices))
    model.linear_kernels = "avx512"
    log.info("linears packed for avx512 (%d Llama blocks + LM head)", len(model.blocks))
    return "avx512"


def _pack_llama_onednn(model: Llama) -> str:
    """oneDNN-packed copies of a Llama's linears (SiLU-gate stays in torch) and LM head."""
    for block in model.blocks:
        block.qkv, block.o_proj = PackedLinear(block.qkv), PackedLinear(block.o_proj)
        block.gate_up, block.down = PackedLinear(block.gate_up), PackedLinear(block.down)
    model.lm_head = PackedLinear(model.wte.weight if model.lm_head is None else model.lm_head)
    model.linear_kernels = "onednn"
    first = model.blocks[0]
    for layer in (first.qkv, first.o_proj, first.gate_up, first.down, model.lm_head):
        layer.warm_up()
    log.info("linears packed for onednn (%d Llama blocks + LM head)", len(model.blocks))
    return "onednn"

"""The engine's AVX-512 CPU kernels (``csrc/*.c``): the linears' GEMM (with the
activation and residual add fused), layer norm, decode attention (grouped-query too) and
greedy argmax, in fp32; all but argmax also in bf16 where the CPU has AVX512-BF16; and the
Llama family's RMSNorm, RoPE and SiLU gate (fp32 or bf16 on any AVX-512F CPU). Every call
goes through ``native_trace.invoke``, so a forward's calls can be recorded and replayed.
Compiled once per machine into one shared library (``native_build.py``), called through
ctypes (which releases the GIL for the call). The library links the OpenMP runtime torch
itself loaded, so its threads are torch's threads.

Anything missing or failing (not x86-64 Linux, no AVX-512F, no compiler, no libgomp in
this process, a failed compile, no writable cache dir, a library that will not load, or
any error nobody foresaw) makes ``native_kernels()`` raise ``KernelUnavailable`` saying
which: decided once per process and logged once, as a warning. ``auto`` then takes the
torch paths (oneDNN or torch linears, SDPA attention, torch argmax); only an explicit
``avx512`` is an error.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from promptfleet.platform.native_build import BF16_FLAGS, KernelUnavailable, build_library, cpu_flags, loaded_libgomp
from promptfleet.platform.native_trace import invoke

log = logging.getLogger(__name__)

__all__ = ["FUSED_ACTIVATIONS", "KernelUnavailable", "NativeKernels", "build_library", "huge_page_empty",
           "native_kernels", "KernelSupport", "kernel_support", "build_support"]
# activations the GEMM applies in its epilogue (our names -> the C enum); others run after it
FUSED_ACTIVATIONS = {"gelu_new": 1, "gelu_pytorch_tanh": 1, "gelu_fast": 1, "relu": 2}


@dataclass(frozen=True)
class NativeKernels:
    """Handle on the loaded library: ``pack`` a weight once, then ``linear`` per call;
    ``decode_attention`` for a batch of one-token queries over the slot cache; ``argmax``
    of each row (greedy decoding)."""

    lib: ctypes.CDLL
    path: Path
    panel_width: int  # NR: columns per packed panel
    row_block: int    # MR: ``linear`` takes a multiple of this many rows
    bf16: bool = False  # the CPU has AVX512-BF16/BW/VL: bf16 GEMM and attention run

    def packed_numel(self, out_features: int, in_features: int) -> int:
        return -(-out_features // self.panel_width) * self.panel_width * in_features

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype == torch.float32 or (dtype == torch.bfloat16 and self.bf16)

    def padded_rows(self, rows: int) -> int:
        """``rows`` rounded up to the GEMM's row block (what ``linear`` takes)."""
        return -(-rows // self.row_block) * self.row_block

    def function_for(self, name: str, dtype: torch.dtype):
        """The library's ``name`` (``pf_linear``, ``pf_pack``) for fp32, its ``_bf16`` twin for bf16."""
        return getattr(self.lib, name if dtype == torch.float32 else f"{name}_bf16")

    def pack(self, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, K]`` weight (fp32, or bf16 with K even) -> the kernel's panel layout: a flat
        tensor of the weight's dtype, ``out`` when given (``packed_numel`` elements, e.g. a
        slice of one arena for all weights)."""
        if not self.supports(weight.dtype) or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"native GEMM packs 2-D float32 CPU weights, or bfloat16 ones on a CPU with "
                             f"AVX512-BF16 (got {weight.dtype}, {weight.device})")
        weight = weight.detach().contiguous()
        n, k = weight.shape
        if weight.dtype == torch.bfloat16 and k % 2:
            raise ValueError(f"the bf16 GEMM pairs the inner dimension: it must be even (got {k})")
        numel = self.packed_numel(n, k)
        if out is None:
            out = torch.empty(numel, dtype=weight.dtype)
        elif out.shape != (numel,) or out.dtype != weight.dtype or not out.is_contiguous():
            raise ValueError(f"pack needs a contiguous {weight.dtype} buffer of {numel} elements")
        self.function_for("pf_pack", weight.dtype)(weight.data_ptr(), n, k, out.data_ptr())
        return out

    def linear(self, x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
               *, activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(x @ W.T + bias) + residual`` for 2-D ``x`` (the packed weight's dtype) with a
        row count that is a multiple of ``row_block``; ``activation`` one of
        ``FUSED_ACTIVATIONS`` or None, ``residual`` (optional) shaped like the output."""
        m, k = x.shape
        dtype = packed.dtype
        if (m % self.row_block or x.dtype != dtype or packed.numel() % (k * self.panel_width)
                or (activation is not None and activation not in FUSED_ACTIVATIONS)
                or (bias is not None and bias.dtype != dtype)
                or (residual is not None and (residual.shape != (m, out_features) or residual.dtype != dtype))):
            raise ValueError(f"bad native GEMM call: x {tuple(x.shape)} {x.dtype}, packed {packed.numel()} {dtype}, "
                             f"activation {activation!r}, residual {None if residual is None else tuple(residual.shape)}")
        x = x.contiguous()
        if residual is not None:
            residual = residual.contiguous()
        out = torch.empty(m, out_features, dtype=dtype)
        invoke(self.function_for("pf_linear", dtype),
               (x.data_ptr(), m, k, packed.data_ptr(), out_features, None if bias is None else bias.data_ptr(),
                FUSED_ACTIVATIONS.get(activation, 0), None if residual is None else residual.data_ptr(),
                out.data_ptr(), torch.get_num_threads()))
        return out

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
        """``F.layer_norm`` over the last dimension of a CPU tensor (fp32, or bf16 where
        ``supports`` it: computed in fp32, rounded once)."""
        d = x.shape[-1]
        if (not self.supports(x.dtype) or x.device.type != "cpu" or d == 0
                or any(t is not None and (t.shape != (d,) or t.dtype != x.dtype or not t.is_contiguous())
                       for t in (weight, bias))):
            raise ValueError(f"bad native layer norm call: x {tuple(x.shape)} {x.dtype} on {x.device}")
        x = x.contiguous()
        out = torch.empty_like(x)
        invoke(self.lib.pf_layer_norm, (x.data_ptr(), x.numel() // d, d, None if weight is None else weight.data_ptr(),
                                        None if bias is None else bias.data_ptr(), eps, out.data_ptr(),
                                        int(x.dtype == torch.bfloat16), torch.get_num_threads()),
               refusal="native layer norm could not get scratch memory")
        return out

    def decode_attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot0: int,
                         lens: torch.Tensor, k_new: torch.Tensor | None = None,
                         v_new: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax attention of ``q`` ``[B, H, D]`` over the first ``lens[b]`` positions of
        cache slot ``slot0 + b`` (caches ``[slots, positions, H_kv, D]``, contiguous, with
        ``H_kv`` dividing ``H``: query head h reads KV head ``h // (H / H_kv)``, grouped-query
        attention; fp32, or bf16 where ``supports`` it, with fp32 arithmetic); returns
        ``[B, H, D]`` (``out``'s first B rows when given). ``k_new``/``v_new``
        (``[B, H_kv, D]``), when given, are stored at position ``lens[b] - 1`` first: this
        step's token. ``q``/``k_new``/``v_new`` may be row-strided views of one buffer (e.g.
        one fused qkv output): read in place, not copied."""
        b, h, d = q.shape
        slots, positions, kv_heads = k_cache.shape[:3]
        new = [t for t in (k_new, v_new) if t is not None]
        dtype = k_cache.dtype
        if (not self.supports(dtype) or q.dtype != dtype or v_cache.dtype != dtype or k_cache.shape != v_cache.shape
                or k_cache.shape[3] != d or h % kv_heads or d % 16
                or not (k_cache.is_contiguous() and v_cache.is_contiguous())
                or lens.dtype != torch.int32 or lens.shape != (b,) or not 0 <= slot0 <= slots - b
                or len(new) == 1 or any(t.shape != (b, kv_heads, d) or t.dtype != dtype for t in new)
                or (out is not None and (out.dtype != dtype or out.shape[1:] != (h, d) or out.shape[0] < b
                                         or not out.is_contiguous()))):
            raise ValueError(f"bad native attention call: q {tuple(q.shape)} {q.dtype}, cache {tuple(k_cache.shape)}")
        rows = [q, *new]
        if not all(t.stride(1) == d and t.stride(2) == 1 and t.stride(0) == q.stride(0) >= h * d for t in rows):
            # one row stride for all, heads dense within a row: q, k, v side by side
            packed = torch.cat([t.reshape(b, -1) for t in rows], dim=1)
            rows = [packed[:, :h * d].view(b, h, d)] + [
                packed[:, (h + i * kv_heads) * d:(h + (i + 1) * kv_heads) * d].view(b, kv_heads, d)
                for i in range(len(new))]
        q, k_new, v_new = rows if new else (rows[0], None, None)
        if out is None:
            out = torch.empty(b, h, d, dtype=dtype)
        invoke(self.lib.pf_decode_attention,
               (q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), positions * kv_heads * d, slot0, lens.data_ptr(),
                None if k_new is None else k_new.data_ptr(), None if v_new is None else v_new.data_ptr(),
                q.stride(0), b, h, kv_heads, d, positions, 1.0 / math.sqrt(d), out.data_ptr(),
                int(dtype == torch.bfloat16), torch.get_num_threads()),
               rows_at=9, refusal=lambda: f"native attention refused lengths {lens.tolist()} (cache holds "
                                         f"{positions}) or could not get scratch memory")
        return out[:b]

    def elementwise_ok(self, x: torch.Tensor) -> bool:
        """The element-wise kernels (norms, RoPE, SiLU gate) take fp32 or bf16 on any
        AVX-512F CPU: bf16 there is only widening and rounding."""
        return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """transformers' ``LlamaRMSNorm`` over the last dimension (fp32 or bf16)."""
        d = x.shape[-1]
        if (not self.elementwise_ok(x) or d == 0 or weight.shape != (d,) or weight.dtype != x.dtype
                or not weight.is_contiguous()):
            raise ValueError(f"bad native RMSNorm call: x {tuple(x.shape)} {x.dtype} on {x.device}")
        x = x.contiguous()
        out = torch.empty_like(x)
        invoke(self.lib.pf_rms_norm, (x.data_ptr(), x.numel() // d, d, weight.data_ptr(), eps, out.data_ptr(),
                                      int(x.dtype == torch.bfloat16), torch.get_num_threads()))
        return out

    def rope_table(self, positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin ``[rows, D/2]`` (fp32) of each position's angles ``position * inv_freq``."""
        if (positions.dtype != torch.long or not positions.is_contiguous() or inv_freq.dtype != torch.float32
                or inv_freq.dim() != 1 or not inv_freq.is_contiguous()):
            raise ValueError(f"bad native RoPE table call: positions {positions.dtype}, inv_freq {inv_freq.dtype}")
        rows, half = positions.numel(), inv_freq.shape[0]
        cos, sin = torch.empty(rows, half), torch.empty(rows, half)
        invoke(self.lib.pf_rope_table, (positions.data_ptr(), rows, inv_freq.data_ptr(), half, cos.data_ptr(),
                                        sin.data_ptr()))
        return cos, sin

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate ``x`` ``[rows, heads, D]`` in place (transformers' ``rotate_half`` pairs);
        rows may be strided (e.g. q and k next to each other in a qkv output)."""
        rows, heads, d = x.shape
        if (not self.elementwise_ok(x) or d % 2 or x.stride(2) != 1 or x.stride(1) != d
                or cos.shape != (rows, d // 2) or sin.shape != cos.shape or cos.dtype != torch.float32
                or not (cos.is_contiguous() and sin.is_contiguous())):
            raise ValueError(f"bad native RoPE call: x {tuple(x.shape)} {x.dtype} strides {x.stride()}")
        invoke(self.lib.pf_rope, (x.data_ptr(), rows, x.stride(0), heads, d, cos.data_ptr(), sin.data_ptr(),
                                  int(x.dtype == torch.bfloat16), torch.get_num_threads()))

    def silu_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up`` ``[rows, 2I]`` (gate first): ``[rows, I]``."""
        rows, width = gate_up.shape
        if not self.elementwise_ok(gate_up) or width % 2 or not gate_up.is_contiguous():
            raise ValueError(f"bad native SiLU-gate call: {tuple(gate_up.shape)} {gate_up.dtype}")
        out = torch.empty(rows, width // 2, dtype=gate_up.dtype)
        invoke(self.lib.pf_silu_gate, (gate_up.data_ptr(), rows, width // 2, out.data_ptr(),
                                       int(gate_up.dtype == torch.bfloat16), torch.get_num_threads()))
        return out

    def argmax(self, x: torch.Tensor) -> list[int]:
        """``x.argmax(-1).tolist()`` for a 2-D fp32 CPU tensor (first index of the max; of
        the first NaN where there is one)."""
        if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[1] == 0:
            raise ValueError(f"bad native argmax call: {tuple(x.shape)} {x.dtype} on {x.device}")
        x = x.contiguous()
        out = torch.empty(x.shape[0], dtype=torch.long)
        self.lib.pf_argmax_rows(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr(), torch.get_num_threads())
        return out.tolist()


HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux


def huge_page_empty(numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised 1-D tensor on 2 MB-aligned memory advised for transparent huge
    pages before anything touches it. The packed weights are streamed from DRAM every
    decode step; on 4 KB pages that is 122k TLB misses a step for GPT-2-small (huge pages
    are faster side by side: README, Benchmarks). Where THP is off or
    ``madvise`` fails, plain pages: same numbers, a little slower."""
    size = torch.empty(0, dtype=dtype).element_size()
    span = -(-numel * size // HUGE_PAGE) * HUGE_PAGE
    buf = torch.empty((span + HUGE_PAGE) // size, dtype=dtype)  # untouched: no page is resident yet
    start = -(-buf.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.madvise(start, span, MADV_HUGEPAGE) != 0:
            log.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
    offset = (start - buf.data_ptr()) // size
    return buf[offset: offset + numel]  # a view: keeps buf's storage alive


def load(path: Path) -> NativeKernels:
    """The library at ``path`` with its functions' signatures declared; ``KernelUnavailable``
    when it will not load (not a shared object, a ``noexec`` mount, missing symbols)."""
    try:
        lib = ctypes.CDLL(str(path))
        kernels = _declare(lib, path)
    except (OSError, AttributeError) as exc:
        raise KernelUnavailable(f"cannot load the kernel library {path}: {exc}") from exc
    loaded_libgomp()  # still exactly one OpenMP runtime: ours is torch's
    return kernels


def _declare(lib: ctypes.CDLL, path: Path) -> NativeKernels:
    ptr, long_ = ctypes.c_void_p, ctypes.c_long
    lib.pf_linear.argtypes = [ptr, long_, long_, ptr, long_, ptr, ctypes.c_int, ptr, ptr, ctypes.c_int]
    lib.pf_linear.restype = None
    lib.pf_has_bf16.restype = ctypes.c_int
    compiled_bf16 = bool(lib.pf_has_bf16())  # the compiler knew AVX512-BF16
    if compiled_bf16:
        lib.pf_linear_bf16.argtypes = lib.pf_linear.argtypes
        lib.pf_linear_bf16.restype = None
        lib.pf_pack_bf16.argtypes = [ptr, long_, long_, ptr]
        lib.pf_pack_bf16.restype = None
    lib.pf_layer_norm.argtypes = [ptr, long_, long_, ptr, ptr, ctypes.c_float, ptr, ctypes.c_int, ctypes.c_int]
    lib.pf_layer_norm.restype = ctypes.c_int
    lib.pf_pack.argtypes = [ptr, long_, long_, ptr]
    lib.pf_pack.restype = None
    lib.pf_panel_width.restype = lib.pf_row_block.restype = ctypes.c_int
    lib.pf_decode_attention.argtypes = [ptr, ptr, ptr, long_, long_, ptr, ptr, ptr, long_, long_, long_, long_, long_,
                                        long_, ctypes.c_float, ptr, ctypes.c_int, ctypes.c_int]
    lib.pf_decode_attention.restype = ctypes.c_int
    lib.pf_rms_norm.argtypes = [ptr, long_, long_, ptr, ctypes.c_float, ptr, ctypes.c_int, ctypes.c_int]
    lib.pf_rope_table.argtypes = [ptr, long_, ptr, long_, ptr, ptr]
    lib.pf_rope.argtypes = [ptr, long_, long_, long_, long_, ptr, ptr, ctypes.c_int, ctypes.c_int]
    lib.pf_silu_gate.argtypes = [ptr, long_, long_, ptr, ctypes.c_int, ctypes.c_int]
    lib.pf_rms_norm.restype = lib.pf_rope_table.restype = lib.pf_rope.restype = lib.pf_silu_gate.restype = None
    lib.pf_argmax_rows.argtypes = [ptr, long_, long_, ptr, ctypes.c_int]
    lib.pf_argmax_rows.restype = None
    return NativeKernels(lib=lib, path=path, panel_width=lib.pf_panel_width(), row_block=lib.pf_row_block(),
                         bf16=compiled_bf16 and all(flag in cpu_flags() for flag in BF16_FLAGS))


FALLBACK = "using the torch paths instead (oneDNN or torch linears, SDPA attention, torch argmax)"
_LOCK = threading.Lock()  # one build, and one warning, however many threads ask first


@functools.cache
def _native_kernels_or_reason() -> NativeKernels | KernelUnavailable:
    """Build and load once; any failure becomes the cached refusal (never retried, never
    raised here: whatever asks falls back, or refuses an explicit ``avx512``)."""
    try:
        return load(build_library())
    except KernelUnavailable as exc:
        log.warning("native AVX-512 kernels unavailable: %s; %s", exc, FALLBACK)
        return exc
    except Exception as exc:  # noqa: BLE001 - a kernel that fails to build must never stop the engine
        log.warning("native AVX-512 kernels unavailable: unexpected %s: %s; %s", type(exc).__name__, exc, FALLBACK,
                    exc_info=True)
        refusal = KernelUnavailable(f"building or loading them failed unexpectedly: {type(exc).__name__}: {exc}")
        refusal.__cause__ = exc
        return refusal


def _outcome() -> NativeKernels | KernelUnavailable:
    with _LOCK:
        return _native_kernels_or_reason()


def native_kernels() -> NativeKernels:
    """This process's kernels, built and loaded once; raises ``KernelUnavailable``."""
    outcome = _outcome()
    if isinstance(outcome, KernelUnavailable):
        raise KernelUnavailable(str(outcome)) from outcome  # a fresh one: the cached refusal gathers no tracebacks
    return outcome


@dataclass(frozen=True)
class KernelSupport:
    """Whether the native kernels run (here, or for a device and dtype), and if not, why."""

    reason: str | None = None  # None: they run

    @property
    def available(self) -> bool:
        return self.reason is None


def build_support() -> KernelSupport:
    """Whether the kernel library built and loaded in this process (else why not)."""
    outcome = _outcome()
    return KernelSupport(str(outcome) if isinstance(outcome, KernelUnavailable) else None)


def kernel_support(device: torch.device, dtype: torch.dtype) -> KernelSupport:
    """Whether the kernels run on tensors of this device and dtype (else why not)."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return KernelSupport(f"they run float32 (or bfloat16) on CPU (got {device.type}, {dtype})")
    built = build_support()
    if built.available and dtype == torch.bfloat16 and not native_kernels().bf16:
        missing = [flag for flag in BF16_FLAGS if flag not in cpu_flags()]
        if not missing:
            return KernelSupport("bfloat16 kernels need a compiler with AVX512-BF16 intrinsics (GCC 10+, clang 9+)")
        return KernelSupport(f"bfloat16 needs a CPU with {', '.join(BF16_FLAGS)} "
                             f"(this one lacks {', '.join(missing)})")
    return built

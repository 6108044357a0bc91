"""Which attention backend the engine runs, checked once at startup.

Backends:

- ``sdpa``: torch's ``scaled_dot_product_attention`` for every group (any device and dtype).
- ``flash``: flash-attn 2's ``flash_attn_with_kvcache`` (CUDA, fp16/bf16, compute capability
  >= 8.0, head_dim a multiple of 8 up to 256, the ``flash_attn`` package installed).
- ``flex``: prompt chunks through SDPA (its own flash/efficient kernels on CUDA) and decode
  rows through FlexAttention over the ragged cache (``torch.nn.attention.flex_attention``,
  compiled by torch: Triton on CUDA, inductor's C++ backend on CPU): no source build.
- ``avx512``: on CPU, SDPA for prompt chunks and the native decode kernel (``native_kernels``).

``choose_attention`` validates device, dtype, compute capability and head_dim for the
backend asked for, and refuses (``ValueError``, naming what is missing) one that cannot
run; ``auto`` takes the fastest that can: on CUDA flash, else flex, else SDPA; on CPU
avx512, else SDPA. The choice carries its reason, which the engine logs at startup.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from promptfleet.platform.native_kernels import kernel_support

ATTENTION = ("auto", "sdpa", "flash", "flex", "avx512")
FLASH_MIN_CAPABILITY = (8, 0)     # flash-attn 2: Ampere or newer
FLASH_MAX_HEAD_DIM = 256
FLEX_HEAD_DIMS = (16, 256)        # what FlexAttention's kernels are built for (inclusive)


@dataclass(frozen=True)
class DeviceProbe:
    """What this machine offers, as the checks see it (tests pass their own)."""

    capability: tuple[int, int] | None  # CUDA compute capability of the device; None off CUDA
    flash_attn: bool                    # the flash_attn package imports
    flex_attention: bool                # torch ships FlexAttention

    @classmethod
    def detect(cls, device: torch.device) -> "DeviceProbe":
        capability = None
        if device.type == "cuda" and torch.cuda.is_available():
            capability = tuple(torch.cuda.get_device_capability(device))
        return cls(capability=capability, flash_attn=_importable("flash_attn"),
                   flex_attention=_importable("torch.nn.attention.flex_attention"))


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class AttentionChoice:
    name: str
    reason: str


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def flash_problem(device: torch.device, dtype: torch.dtype, head_dim: int, probe: DeviceProbe) -> str | None:
    """Why flash-attn cannot run here, or None."""
    if device.type != "cuda":
        return f"flash-attn runs on CUDA only (this engine runs on {device.type})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16 or bfloat16, not {_dtype_name(dtype)}"
    if probe.capability is None:
        return "no CUDA device is visible"
    if probe.capability < FLASH_MIN_CAPABILITY:
        major, minor = probe.capability
        return f"flash-attn 2 needs compute capability >= 8.0 (this GPU has {major}.{minor})"
    if head_dim % 8 or head_dim > FLASH_MAX_HEAD_DIM:
        return f"flash-attn takes head_dim a multiple of 8 up to {FLASH_MAX_HEAD_DIM}, not {head_dim}"
    if not probe.flash_attn:
        return "the flash_attn package is not installed (pip install flash-attn, a wheel built for this torch/CUDA)"
    return None


def flex_problem(device: torch.device, dtype: torch.dtype, head_dim: int, probe: DeviceProbe) -> str | None:
    """Why the FlexAttention decode path cannot run here, or None."""
    if not probe.flex_attention:
        return "this torch has no torch.nn.attention.flex_attention"
    if device.type not in ("cuda", "cpu"):
        return f"FlexAttention compiles for CUDA or CPU, not {device.type}"
    if device.type == "cuda" and probe.capability is None:
        return "no CUDA device is visible"
    if device.type == "cpu" and dtype == torch.float16:
        return "FlexAttention on CPU takes float32 or bfloat16"
    lo, hi = FLEX_HEAD_DIMS
    if not lo <= head_dim <= hi or head_dim & (head_dim - 1):
        return f"FlexAttention's decode path takes a power-of-two head_dim in {lo}..{hi}, not {head_dim}"
    return None


def avx512_problem(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16"
    return kernel_support(device, dtype).reason


def choose_attention(name: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                     probe: DeviceProbe | None = None) -> AttentionChoice:
    """The backend to run for ``name`` (one of ``ATTENTION``), with why; ``ValueError`` when
    an explicit backend cannot run on this device, dtype, GPU or head_dim."""
    if name not in ATTENTION:
        raise ValueError(f"unknown attention backend {name!r}; use one of {', '.join(ATTENTION)}")
    probe = probe or DeviceProbe.detect(device)
    checks = {"flash": lambda: flash_problem(device, dtype, head_dim, probe),
              "flex": lambda: flex_problem(device, dtype, head_dim, probe),
              "avx512": lambda: avx512_problem(device, dtype, head_dim)}
    if name == "sdpa":
        return AttentionChoice("sdpa", "asked for")
    if name != "auto":
        problem = checks[name]()
        if problem is not None:
            what = "the avx512 attention kernel" if name == "avx512" else f"attention backend {name!r}"
            raise ValueError(f"{what} cannot run here: {problem}")
        return AttentionChoice(name, "asked for")
    order = ("flash", "flex") if device.type == "cuda" else ("avx512",)
    passed_over = []
    for candidate in order:
        problem = checks[candidate]()
        if problem is None:
            why = f"auto on {device.type} {_dtype_name(dtype)}, head_dim {head_dim}"
            return AttentionChoice(candidate, why + (f" ({'; '.join(passed_over)})" if passed_over else ""))
        passed_over.append(f"not {candidate}: {problem}")
    return AttentionChoice("sdpa", f"auto: {'; '.join(passed_over)}")


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                      family: str = "gpt2", probe: DeviceProbe | None = None) -> str:
    """``choose_attention``'s backend name (``family`` is accepted for older callers)."""
    return choose_attention(name, device, dtype, head_dim, probe).name

"""The one place that decides whether a test may be skipped, and says why.

A test may be skipped only for what the machine cannot have: a CPU without the
instructions a native kernel is written in (AVX-512F for fp32, AVX512-BF16 for bf16), a
platform other than x86-64 Linux, or no CUDA device. Everything else a test needs
(a compiler, PostgreSQL, Redis) is an install step: missing, it skips a developer's run
with the reason, but FAILS under ``CI=true``, so a CI machine cannot go green with whole
areas untested."""
from __future__ import annotations

import os
import platform
import sys

import pytest
import torch

FP32_CPU_FLAGS = ("avx512f",)


def in_ci() -> bool:
    """``CI`` set to anything but empty/0/false (as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str) -> None:
    """A needed service or tool is absent: skip with ``what``, or fail under ``CI=true``."""
    if in_ci():
        pytest.fail(f"{what}; CI=true, so this fails instead of skipping (.ci/run must provide it)",
                    pytrace=False)
    pytest.skip(what)


def cpu_cannot_run_native(dtype: torch.dtype = torch.float32) -> str | None:
    """Why this machine's CPU cannot run the native kernels for ``dtype`` (a legitimate
    skip), or ``None`` when it can, whether or not they built."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the native kernels are x86-64 Linux only (this is {sys.platform} {platform.machine()})"
    from promptfleet.platform.native_build import BF16_FLAGS, cpu_flags

    wanted = FP32_CPU_FLAGS + (BF16_FLAGS if dtype == torch.bfloat16 else ())
    lacking = [flag for flag in wanted if flag not in cpu_flags()]
    if lacking:
        return f"this CPU lacks {', '.join(lacking)} (the native {dtype_name(dtype)} kernels need it)"
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def native_unavailable(dtype: torch.dtype = torch.float32) -> str | None:
    """Why the native kernels do not run here for ``dtype``, or ``None`` when they do."""
    from promptfleet.platform.native_kernels import kernel_support

    return kernel_support(torch.device("cpu"), dtype).reason


def needs_native(dtype: torch.dtype = torch.float32) -> pytest.MarkDecorator:
    """Mark for tests of the native kernels: skipped when the CPU cannot run them; when it
    can but the kernels did not build or load, skipped outside CI (with the reason) and
    RUN under ``CI=true``, where they fail on the missing kernel."""
    reason = native_unavailable(dtype)
    cpu = cpu_cannot_run_native(dtype)
    if cpu is not None:
        return pytest.mark.skipif(True, reason=f"CPU feature: {cpu}")
    return pytest.mark.skipif(reason is not None and not in_ci(),
                              reason=f"native {dtype_name(dtype)} kernels unavailable here: {reason}")


def needs_cuda() -> pytest.MarkDecorator:
    """Mark for GPU-only tests: skipped, with the reason, where no CUDA device is visible."""
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU only: no CUDA device is visible")


def require_native(dtype: torch.dtype = torch.float32) -> None:
    """Inside a test: skip when the CPU cannot run the native ``dtype`` kernels; when it
    can but they are unavailable, skip outside CI and fail under ``CI=true``."""
    cpu = cpu_cannot_run_native(dtype)
    if cpu is not None:
        pytest.skip(f"CPU feature: {cpu}")
    reason = native_unavailable(dtype)
    if reason is not None:
        missing(f"native {dtype_name(dtype)} kernels unavailable on a CPU that should run them: {reason}")

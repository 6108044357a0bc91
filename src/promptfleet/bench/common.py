"""Shared pieces of the benchmark scripts: a cached random checkpoint, the measured
matmul peak, percentiles, and the one-JSON-line report."""
from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from promptfleet.platform.linear_kernels import onednn_linear_available
from promptfleet.platform.native_kernels import kernel_support, native_kernels
from promptfleet.platform.random_checkpoint import make_random_checkpoint

log = logging.getLogger(__name__)


def bench_checkpoint(model: str | None, shape: str = "gpt2", seed: int = 0) -> Path:
    """``model`` if given, else a seeded random checkpoint of ``shape`` (cached in /tmp)."""
    if model:
        return Path(model)
    path = Path(tempfile.gettempdir()) / f"promptfleet-bench-{shape}-{seed}"
    if not (path / "model.safetensors").exists():
        log.info("writing a seeded random %s checkpoint to %s (random weights)", shape, path)
        make_random_checkpoint(path, shape=shape, seed=seed)
    return path


def matmul_peak_flops(dtype: torch.dtype = torch.float32, device: str = "cpu", n: int = 2048,
                      seconds: float = 2.0) -> dict[str, float]:
    """Best measured FLOP/s of an ``n x n`` matmul on this machine for ``dtype``, per
    kernel: ``torch.mm`` (MKL on CPU, cuBLAS on CUDA) and, on CPU, oneDNN on a packed
    weight and the engine's own AVX-512 kernel where they run (on AMD CPUs MKL runs its
    AVX2 path and oneDNN its AVX-512 one, about 2x apart). The peak is the best of them:
    a utilisation against a slower kernel's peak would flatter."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    kernels = {"mm": lambda: torch.mm(a, b)}
    if onednn_linear_available(a.device, dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(b, n)
        kernels["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    if kernel_support(torch.device(device), dtype).available:
        gemm = native_kernels()
        panels = gemm.pack(b.T)
        kernels["avx512"] = lambda: gemm.linear(a, panels, n)
    best: dict[str, float] = {}
    for name, fn in kernels.items():
        fn()
        best[name] = 0.0
        deadline = time.perf_counter() + seconds / len(kernels)
        while time.perf_counter() < deadline:
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device != "cpu":
                torch.cuda.synchronize()
            best[name] = max(best[name], 2 * n**3 / (time.perf_counter() - t0))
    best["peak"] = max(best.values())
    return best


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def emit(result: dict) -> None:
    """The benchmark's one line of output."""
    sys.stdout.write(json.dumps(result, sort_keys=False) + "\n")
    sys.stdout.flush()

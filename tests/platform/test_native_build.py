"""Building the native kernels (native_build.py): a build is cached by content, a missing
or failing compiler is a clear refusal, and a shared fallback cache dir is never trusted."""
from __future__ import annotations

import pytest

from promptfleet.platform.native_build import KernelUnavailable, build_library
from promptfleet.platform.native_kernels import build_support
from promptfleet.testing.skips import needs_native

needs_kernel = needs_native()  # why a skip is legitimate: promptfleet.testing.skips


@needs_kernel
def test_build_is_cached_by_content(tmp_path):
    first = build_library(cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build_library(cache_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp files left behind


def test_a_missing_or_failing_compiler_is_a_clear_refusal(tmp_path):
    reason = build_support().reason
    if reason is not None and "compiler" not in reason:
        pytest.skip(f"refused before the compiler is asked: {reason}")
    with pytest.raises(KernelUnavailable, match="no C compiler 'no-such-cc'"):
        build_library(compiler="no-such-cc", cache_dir=tmp_path)
    with pytest.raises(KernelUnavailable, match="compiling the AVX-512 kernels failed"):
        build_library(compiler="false", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_shared_fallback_cache_dir_is_never_trusted(tmp_path, monkeypatch):
    """With no usable ~/.cache the build goes to the temp dir, but only into a directory
    this user owns that nobody else can write: a library planted there is not loaded."""
    import os
    import tempfile

    from promptfleet.platform.native_build import _cache_dir

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    private = _cache_dir()
    assert private == tmp_path / f"promptfleet-kernels-{os.getuid()}" and private.stat().st_mode & 0o777 == 0o700
    private.chmod(0o777)
    with pytest.raises(KernelUnavailable, match="not a private directory"):
        _cache_dir()


@needs_kernel
def test_a_compiler_without_bf16_intrinsics_still_builds_the_fp32_kernels(tmp_path):
    """The bf16 GEMM compiles only where the compiler has AVX512-BF16 (GCC 10+, clang 9+);
    without it the library still builds and loads, and says bf16 is unavailable."""
    import shutil

    import torch
    import torch.nn.functional as F

    from promptfleet.platform.native_kernels import load

    wrapper = tmp_path / "old-cc"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("cc")} -DPF_NO_BF16 "$@"\n')
    wrapper.chmod(0o755)
    (tmp_path / "cache").mkdir()
    kernels = load(build_library(compiler=str(wrapper), cache_dir=tmp_path / "cache"))
    assert kernels.bf16 is False and not kernels.supports(torch.bfloat16)
    assert kernels.lib.pf_has_bf16() == 0
    weight, x = torch.randn(48, 16), torch.randn(8, 16)
    assert torch.allclose(kernels.linear(x, kernels.pack(weight), 48), F.linear(x, weight), atol=1e-5)


def _kernels_build(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "promptfleet.cli", "kernels", "build", *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@needs_kernel
def test_kernels_build_command_builds_ahead_of_time_then_reuses(tmp_path):
    """``promptfleet kernels build`` (the Dockerfile runs it) leaves the library the engine
    would build, in the cache dir given, loadable here; a second run compiles nothing."""
    from promptfleet.platform.native_build import plan_build

    first = _kernels_build("--cache-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    target = plan_build(cache_dir=tmp_path).target
    assert target.is_file() and str(target) in first.stdout and "built in" in first.stdout
    again = _kernels_build("--cache-dir", str(tmp_path))
    assert again.returncode == 0 and "already built" in again.stdout, again.stdout + again.stderr


def test_kernels_build_command_says_why_it_cannot(tmp_path):
    got = _kernels_build("--cache-dir", str(tmp_path), env={"CC": "no-such-cc"})
    assert got.returncode == 1 and "cannot be built or loaded here" in got.stderr, got.stderr
    assert list(tmp_path.iterdir()) == []

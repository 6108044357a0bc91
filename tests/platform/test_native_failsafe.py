"""Native kernels fail safe: whatever stops the AVX-512 library from building or loading
(a compiler that fails, crashes or writes garbage, a library that will not load, no
writable cache dir, an error nobody foresaw), an ``auto`` engine starts and generates on
the torch paths with one warning, and the refusal is cached, not retried. And an engine
configured off the native kernels (linears onednn/torch, attention sdpa) calls none of
them, argmax included."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import torch

from promptfleet.platform import native_kernels as nk
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.platform.linear_kernels import onednn_linear_available
from promptfleet.platform.native_build import KernelUnavailable, plan_build
from promptfleet.platform.sampling import SamplingParams
from promptfleet.testing.skips import require_native

PROMPTS = ("Fail safe kernels", "torch paths", "one warning")
PARAMS = SamplingParams(max_tokens=8, temperature=0, detect_repetition=False)
# what ``auto`` falls back to on CPU fp32
FALLBACK_LINEARS = "onednn" if onednn_linear_available(torch.device("cpu"), torch.float32) else "torch"


def generate(checkpoint: Path, config: EngineConfig) -> tuple[list[list[int]], Engine]:
    """Greedy tokens for ``PROMPTS``, batched together, and the (stopped) engine."""
    engine = Engine.from_pretrained(checkpoint, config)

    async def run() -> list[list[int]]:
        done = await asyncio.gather(*(engine.complete(p, PARAMS) for p in PROMPTS))
        return [d.token_ids for d in done]

    try:
        return asyncio.run(run()), engine
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def reference(small_checkpoint: Path) -> list[list[int]]:
    """The tokens of an engine told to use the torch paths."""
    tokens, _ = generate(small_checkpoint, EngineConfig(max_batch_size=4, linear_kernels=FALLBACK_LINEARS,
                                                        attention="sdpa"))
    return tokens


@pytest.fixture
def fresh_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[int]:
    """The process's kernel outcome forgotten (before and after), builds going to a cache
    dir of this test's own; returns the list that counts ``build_library`` calls."""
    nk._native_kernels_or_reason.cache_clear()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    builds: list[int] = []
    real = nk.build_library

    def counted(**kwargs) -> Path:
        builds.append(1)
        return real(**kwargs)

    monkeypatch.setattr(nk, "build_library", counted)
    yield builds
    nk._native_kernels_or_reason.cache_clear()  # later tests load the real library again


def kernel_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name == nk.__name__]


def assert_auto_falls_back(checkpoint: Path, reference: list[list[int]], builds: list[int],
                           caplog: pytest.LogCaptureFixture) -> str:
    """An ``auto`` engine loads and generates the reference tokens on the torch paths,
    with one warning and one build attempt; returns the warning's text."""
    caplog.set_level(logging.INFO)
    tokens, engine = generate(checkpoint, EngineConfig(max_batch_size=4))
    assert (engine.model.linear_kernels, engine.attention_backend) == (FALLBACK_LINEARS, "sdpa")
    assert tokens == reference
    assert not nk.build_support().available
    with pytest.raises(KernelUnavailable):
        nk.native_kernels()
    generate(checkpoint, EngineConfig(max_batch_size=4))  # a second engine: still no retry, no new warning
    assert len(builds) == 1
    warnings = kernel_warnings(caplog)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "torch paths" in warnings[0].getMessage()
    return warnings[0].getMessage()


def fake_compiler(tmp_path: Path, body: str) -> str:
    script = tmp_path / "fake-cc"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return str(script)


COMPILERS = {
    "fails": 'echo "cc: internal compiler error" >&2; exit 1',
    "crashes": "kill -SEGV $$",
    "writes garbage": ('if [ "$1" = --version ]; then echo fake-cc 1.0; exit 0; fi\n'
                       'for out; do :; done\necho "not a shared object" > "$out"'),
    "writes nothing": "exit 0",
}


@pytest.mark.parametrize("compiler", list(COMPILERS))
def test_a_broken_compiler_falls_back(compiler, small_checkpoint, reference, fresh_build, tmp_path, monkeypatch,
                                      caplog):
    monkeypatch.setenv("CC", fake_compiler(tmp_path, COMPILERS[compiler]))
    assert_auto_falls_back(small_checkpoint, reference, fresh_build, caplog)


def test_an_unloadable_library_falls_back(small_checkpoint, reference, fresh_build, caplog):
    """A cached library that will not load (corrupt, or on a ``noexec`` mount, where
    ``dlopen`` fails the same way): the build reuses it, the load fails, auto falls back."""
    try:
        target = plan_build().target
    except KernelUnavailable as exc:
        pytest.skip(f"the kernels are refused before a library is looked for: {exc}")
    target.write_bytes(b"\x7fELF but not really a shared object")
    message = assert_auto_falls_back(small_checkpoint, reference, fresh_build, caplog)
    assert "cannot load the kernel library" in message and str(target) in message


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create anything in: a read-only one, or for root
    (whom permissions do not stop) sysfs."""
    ro = tmp_path / "read-only"
    ro.mkdir()
    ro.chmod(0o555)
    candidates = [ro, Path("/sys")]
    for path in candidates:
        probe = path / "promptfleet-probe"
        try:
            probe.mkdir()
        except OSError:
            return path
        probe.rmdir()
    pytest.skip("no directory here that this process cannot write")


def test_no_writable_cache_dir_falls_back(small_checkpoint, reference, fresh_build, tmp_path, monkeypatch, caplog):
    """Neither ``$XDG_CACHE_HOME`` nor the temp dir takes the library."""
    import tempfile

    blocked = unwritable_dir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    monkeypatch.setattr(tempfile, "tempdir", str(blocked))
    try:
        plan_build(cache_dir=tmp_path)
    except KernelUnavailable as exc:
        pytest.skip(f"the kernels are refused before a cache dir is looked for: {exc}")
    message = assert_auto_falls_back(small_checkpoint, reference, fresh_build, caplog)
    assert "no writable cache dir" in message


def test_an_unforeseen_error_is_a_cached_refusal(fresh_build, monkeypatch, caplog):
    """An exception nobody anticipated while building becomes the refusal: logged once
    (with its traceback), never raised to the caller as itself, never retried."""
    def broken(**kwargs) -> Path:
        fresh_build.append(1)
        raise ZeroDivisionError("a bug in the build")

    monkeypatch.setattr(nk, "build_library", broken)
    caplog.set_level(logging.INFO)
    for _ in range(3):
        assert "ZeroDivisionError: a bug in the build" in nk.build_support().reason
        assert not nk.kernel_support(torch.device("cpu"), torch.float32).available
        with pytest.raises(KernelUnavailable, match="ZeroDivisionError"):
            nk.native_kernels()
    assert len(fresh_build) == 1
    warnings = kernel_warnings(caplog)
    assert len(warnings) == 1 and warnings[0].exc_info is not None


NATIVE_METHODS = ("pack", "linear", "layer_norm", "decode_attention", "argmax")
NATIVE_FUNCTIONS = ("pf_pack", "pf_linear", "pf_pack_bf16", "pf_linear_bf16", "pf_layer_norm",
                    "pf_decode_attention", "pf_argmax_rows")


def spy_on_native(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and pass on) every way into the native kernels: getting them at all
    (build, load or the cached outcome), each ``NativeKernels`` method, and each C function."""
    calls: list[str] = []

    def recording(name: str, fn):
        def spy(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        return spy

    if nk.build_support().available:
        lib = nk.native_kernels().lib
        for name in NATIVE_FUNCTIONS:
            if hasattr(lib, name):
                monkeypatch.setattr(lib, name, recording(name, getattr(lib, name)))
    for name in NATIVE_METHODS:
        monkeypatch.setattr(nk.NativeKernels, name, recording(name, getattr(nk.NativeKernels, name)))
    monkeypatch.setattr(nk, "_native_kernels_or_reason", recording("outcome", nk._native_kernels_or_reason))
    return calls


@pytest.mark.parametrize("linears", sorted({FALLBACK_LINEARS, "torch"}))
def test_non_native_config_calls_no_native_kernel(linears, small_checkpoint, monkeypatch):
    config = EngineConfig(max_batch_size=4, linear_kernels=linears, attention="sdpa")
    want, _ = generate(small_checkpoint, config)
    calls = spy_on_native(monkeypatch)
    got, engine = generate(small_checkpoint, config)
    assert (engine.model.linear_kernels, engine.attention_backend) == (linears, "sdpa")
    assert got == want
    assert calls == []


def test_the_spy_sees_native_calls(small_checkpoint, monkeypatch):
    """The spy above can fail: an ``auto`` engine where the kernels run is seen calling them."""
    if not nk.kernel_support(torch.device("cpu"), torch.float32).available:
        require_native(torch.float32)
    calls = spy_on_native(monkeypatch)
    generate(small_checkpoint, EngineConfig(max_batch_size=4))
    assert {"outcome", "pf_linear", "pf_decode_attention", "argmax", "pf_argmax_rows"} <= set(calls)


def test_a_llama_falls_back_too(tmp_path, fresh_build, monkeypatch, caplog):
    """The same for a Llama, whose ``auto`` is the native kernels where they build."""
    from promptfleet.platform.random_checkpoint import make_random_llama_checkpoint

    ckpt = make_random_llama_checkpoint(tmp_path / "llama", shape="llama-tiny", seed=8, scale=4.0)
    want, _ = generate(ckpt, EngineConfig(max_batch_size=4, linear_kernels=FALLBACK_LINEARS, attention="sdpa"))
    monkeypatch.setenv("CC", fake_compiler(tmp_path, COMPILERS["fails"]))
    assert_auto_falls_back(ckpt, want, fresh_build, caplog)

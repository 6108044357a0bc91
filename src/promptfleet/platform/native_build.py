"""Building the native kernels (``csrc/``) into a shared library: once per machine, with
the machine's C compiler, into ``$XDG_CACHE_HOME/promptfleet/kernels`` (``~/.cache/...``;
a private temp dir if that is not writable), under a name that hashes the sources, the
flags and the compiler, so an edit or a new compiler rebuilds. It links the OpenMP
runtime torch itself loaded (two runtimes would each keep a pool spinning on the same
cores). Anything missing or failing (no compiler, a failed compile, no writable cache
dir) raises ``KernelUnavailable`` saying what; ``native_kernels.py`` loads the result and
turns any other failure into the same refusal.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(CSRC / name for name in
                ("gemm_avx512.c", "gemm_bf16_avx512.c", "layernorm_avx512.c", "decode_attention_avx512.c",
                 "argmax_avx512.c", "llama_ops_avx512.c"))
HEADERS = (CSRC / "vec_math_avx512.h", CSRC / "gemm_panels.h")
# -ffp-contract=off: a multiply and an add written apart stay apart (as torch computes them)
FLAGS = ("-O3", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-ffp-contract=off")


class KernelUnavailable(RuntimeError):
    """The native kernel cannot run here; the message says why."""


def loaded_libgomp() -> Path:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError as exc:
        raise KernelUnavailable(f"cannot read /proc/self/maps to find torch's OpenMP runtime: {exc}") from exc
    paths = {line.split()[-1] for line in maps.splitlines() if "/libgomp" in line}
    if len(paths) != 1:
        raise KernelUnavailable(f"expected torch's one libgomp in this process, found {sorted(paths) or 'none'}")
    return Path(paths.pop())


BF16_FLAGS = ("avx512_bf16", "avx512bw", "avx512vl")  # what the bf16 GEMM's target attribute uses


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return next((set(line.split(":", 1)[1].split()) for line in info if line.startswith("flags")), set())
    except OSError:
        return set()


def _cpu_has_avx512f() -> bool:
    return "avx512f" in cpu_flags()


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promptfleet" / "kernels"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
        why = "not writable"
    except OSError as exc:
        why = str(exc)
    fallback = Path(tempfile.gettempdir()) / f"promptfleet-kernels-{os.getuid()}"
    try:
        fallback.mkdir(mode=0o700, exist_ok=True)
        st = fallback.lstat()
    except OSError as exc:
        raise KernelUnavailable(f"no writable cache dir for the kernel library: {base} ({why}), "
                                f"{fallback} ({exc})") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        # a shared temp dir: a library someone else could have put there is never loaded
        raise KernelUnavailable(f"{fallback} is not a private directory of this user")
    return fallback


@dataclass(frozen=True)
class BuildPlan:
    """How the library is compiled, and where to (``target``'s name hashes sources, flags and compiler)."""

    compiler: str
    flags: tuple[str, ...]
    target: Path


def plan_build(*, compiler: str | None = None, cache_dir: Path | None = None) -> BuildPlan:
    """Check this machine can build the kernels (x86-64 Linux, AVX-512F, a compiler that
    runs, torch's libgomp) and name the library for these sources, flags and compiler."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise KernelUnavailable(f"x86-64 Linux only (this is {sys.platform} {platform.machine()})")
    if not _cpu_has_avx512f():
        raise KernelUnavailable("this CPU has no AVX-512F")
    cc = compiler or os.environ.get("CC") or "cc"
    cc_path = shutil.which(cc)
    if cc_path is None:
        raise KernelUnavailable(f"no C compiler {cc!r} on PATH (set CC)")
    gomp = loaded_libgomp()
    try:
        version = subprocess.run([cc_path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"C compiler {cc_path} does not run: {exc}") from exc
    flags = (*FLAGS, f"-L{gomp.parent}", f"-Wl,-rpath,{gomp.parent}")
    try:
        code = b"".join(src.read_bytes() for src in (*SOURCES, *HEADERS))
    except OSError as exc:
        raise KernelUnavailable(f"cannot read the kernel sources: {exc}") from exc
    digest = hashlib.sha256(code + repr((flags, version)).encode()).hexdigest()[:16]
    return BuildPlan(cc_path, flags, (cache_dir or _cache_dir()) / f"promptfleet_avx512-{digest}.so")


def build_library(*, compiler: str | None = None, cache_dir: Path | None = None) -> Path:
    """Compile ``SOURCES`` (or reuse the cached build); returns the shared library's path."""
    plan = plan_build(compiler=compiler, cache_dir=cache_dir)
    if not plan.target.exists():
        _compile(plan)
    return plan.target


def _compile(plan: BuildPlan) -> None:
    tmp = plan.target.with_name(f"{plan.target.name}.{os.getpid()}.tmp")
    cmd = [plan.compiler, *plan.flags, *map(str, SOURCES), "-o", str(tmp)]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelUnavailable(f"compiling the AVX-512 kernels failed: {exc}") from exc
        if proc.returncode != 0:
            raise KernelUnavailable(f"compiling the AVX-512 kernels failed (exit {proc.returncode}): "
                                    f"{proc.stderr.strip()[-800:]}")
        if not tmp.is_file():
            raise KernelUnavailable(f"the C compiler {plan.compiler} exited 0 but wrote no library")
        try:
            os.replace(tmp, plan.target)  # atomic: a concurrent build writes the same bytes
        except OSError as exc:
            raise KernelUnavailable(f"cannot store the compiled kernels at {plan.target}: {exc}") from exc
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # an unwritable dir: the compiler could not have written there either
    log.info("compiled the AVX-512 kernels -> %s", plan.target)

"""Record the native kernel calls of one forward and replay them: how a decode step runs
the model's own block code without its Python.

Why: a decode step on the native kernels is a few hundred kernel calls, and between them
the module code (module calls, views, checks, allocations) cost ~8% of a GPT-2-small step
at batch 32 and more for a deep narrow Llama (SmolLM2: 30 blocks of width 576). Instead
of a second, hand-written copy of each block for decode, ``capture`` runs the module
forward once (for real: it is that step's computation), records every kernel call with its
arguments (``invoke``), and checks that nothing but views and allocations ran in torch
between them (a torch computation would be skipped on replay). The buffers the forward
allocated are then re-laid in one arena by their lifetimes (a block's temporaries reuse the
previous block's memory, as torch's allocator did for the live forward) and the recorded
pointers rewritten to it. ``DecodeGraph.replay`` makes the same calls again, with only
the batch's row count patched into the attention calls; inputs go into the static buffers
the capture read. The result is the module path's, kernel for kernel, bit for bit (checked
once per capture, and tested).
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

log = logging.getLogger(__name__)

_LOCAL = threading.local()
ALIGN = 64
_ALLOCATIONS = {torch.ops.aten.empty.memory_format, torch.ops.aten.empty_strided.default,
                torch.ops.aten.empty_like.default}


class NotReplayable(RuntimeError):
    """The forward did something a replay of its kernel calls would not repeat."""


@dataclass
class Call:
    fn: Callable
    args: list
    rows_at: int | None             # which argument is the step's row count (patched on replay)
    refusal: str | Callable[[], str] | None  # a non-zero return raises ValueError(refusal)


def invoke(fn: Callable, args: tuple, *, rows_at: int | None = None,
           refusal: str | Callable[[], str] | None = None):
    """Call a kernel (recording the call when a capture is under way)."""
    calls = getattr(_LOCAL, "calls", None)
    if calls is not None:
        calls.append(Call(fn, list(args), rows_at, refusal))
    rc = fn(*args)
    if refusal is not None and rc != 0:
        raise ValueError(refusal() if callable(refusal) else refusal)
    return rc


class _OnlyViews(TorchDispatchMode):
    """Lets views and allocations through (recording what was allocated); anything else,
    and a 'view' that copied (``reshape``/``contiguous`` of a strided tensor), refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.allocated: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _ALLOCATIONS:
            self.allocated.append(out)
            return out
        if not func.is_view:
            raise NotReplayable(f"{func} computed in torch between the kernel calls")
        base = args[0].untyped_storage().data_ptr()
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if t.untyped_storage().data_ptr() != base:
                raise NotReplayable(f"{func} copied its input")
        return out


@dataclass
class _Buffer:
    tensor: torch.Tensor
    start: int
    nbytes: int
    first: int = -1
    last: int = -1
    offset: int = 0

    def holds(self, value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.start <= value < self.start + self.nbytes


@dataclass
class DecodeGraph:
    """A recorded forward: ``replay(rows)`` re-runs its kernel calls; ``output`` then holds
    the result (in the arena)."""

    calls: list[Call]
    output: torch.Tensor
    arena: torch.Tensor = field(repr=False)

    def replay(self, rows: int) -> torch.Tensor:
        for call in self.calls:
            if call.rows_at is not None:
                call.args[call.rows_at] = rows
            rc = call.fn(*call.args)
            if call.refusal is not None and rc != 0:
                raise ValueError(call.refusal() if callable(call.refusal) else call.refusal)
        return self.output


def capture(run: Callable[[], torch.Tensor], rows: int) -> DecodeGraph:
    """Run ``run()`` (a forward over static input buffers returning ``[1, P, d]``, of which
    the first ``rows`` are real), record
    its kernel calls, and return them as a replayable graph; ``NotReplayable`` when the
    forward computed anything in torch, or its replay does not reproduce its output."""
    guard, calls = _OnlyViews(), []
    _LOCAL.calls = calls
    try:
        with guard:
            out = run()
    finally:
        _LOCAL.calls = None
    want = out[:, :rows].clone()  # [1, P, d]: rows past ``rows`` are padding, never read
    buffers = [_Buffer(t, t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in guard.allocated]
    out_buffer = next((b for b in buffers if b.start == out.untyped_storage().data_ptr()), None)
    if out_buffer is None:
        raise NotReplayable("the forward's output is not a buffer it allocated")
    size = _plan(buffers, calls, out_buffer)
    arena = torch.empty(size + ALIGN, dtype=torch.uint8)
    base = -(-arena.data_ptr() // ALIGN) * ALIGN
    for call in calls:
        for i, value in enumerate(call.args):
            b = next((b for b in buffers if b.holds(value)), None)
            if b is not None:
                call.args[i] = value - b.start + base + b.offset
    at = base + out_buffer.offset - arena.data_ptr()
    flat = arena[at:at + out_buffer.nbytes].view(out.dtype)
    output = flat.as_strided(out.shape, out.stride(), flat.storage_offset() + out.storage_offset())
    graph = DecodeGraph(calls, output, arena)
    del buffers, out_buffer, guard  # the capture's own buffers are free again
    if not torch.equal(graph.replay(rows)[:, :rows], want):
        raise NotReplayable("the replayed calls did not reproduce the forward's output")
    return graph


def _plan(buffers: list[_Buffer], calls: list[Call], out_buffer: _Buffer) -> int:
    """Give each buffer an arena offset, sharing memory between buffers whose uses (first to
    last call that points into them) do not overlap; returns the arena's size."""
    for i, call in enumerate(calls):
        for value in call.args:
            for b in buffers:
                if b.holds(value):
                    b.first = i if b.first < 0 else b.first
                    b.last = i
    out_buffer.first = 0 if out_buffer.first < 0 else out_buffer.first
    out_buffer.last = len(calls)  # read after the last call
    placed: list[_Buffer] = []
    size = 0
    for b in sorted((b for b in buffers if b.first >= 0), key=lambda b: b.first):
        live = sorted((p for p in placed if p.last >= b.first), key=lambda p: p.offset)
        offset = 0
        for p in live:
            if offset + b.nbytes <= p.offset:
                break
            offset = max(offset, -(-(p.offset + p.nbytes) // ALIGN) * ALIGN)
        b.offset = offset
        placed.append(b)
        size = max(size, offset + b.nbytes)
    return size

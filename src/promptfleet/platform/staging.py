"""One step's small host tensors (token ids, positions, cache indices, sampling floats)
moved to the device in ONE copy.

Each piece is registered as a host tensor (``add``) and read back on the device after
``flush`` (``Staged.get``). The pieces travel as one int64 buffer (a float64 piece
travels as its bits, a bool or int32 one widened and narrowed again on the device), so a
step makes one host-to-device copy instead of one per tensor. On CUDA the buffer is
pinned and the copy is ``non_blocking``; the pinned buffers are kept (two, used in turn:
a step ends with a device-to-host read of its tokens, which waits for the copy before the
buffer is used again) and grow as needed. Off CUDA the pieces stay where they are.
"""
from __future__ import annotations

import torch

_WIDE = {torch.int64: None, torch.float64: torch.float64, torch.int32: torch.int32, torch.bool: torch.bool}


class Staged:
    """A tensor that lives on the device once its staging is flushed."""

    __slots__ = ("_host", "_device", "_dtype", "_stage")

    def __init__(self, host: torch.Tensor, stage: "StepStaging") -> None:
        self._host, self._device, self._dtype, self._stage = host, None, host.dtype, stage

    def get(self) -> torch.Tensor:
        if self._device is None:
            raise RuntimeError("a staged tensor is read before its step's staging was flushed")
        return self._device

    @property
    def host(self) -> torch.Tensor:
        return self._host


class StepStaging:
    """Collects one step's host tensors; ``flush`` moves them all at once."""

    def __init__(self, device: torch.device, pinned: "PinnedBuffers | None" = None, *,
                 pack: bool | None = None) -> None:
        self.device = torch.device(device)
        self.pack = self.device.type != "cpu" if pack is None else pack  # CPU tests pack to check the layout
        self._pinned = pinned
        self._pieces: list[Staged] = []
        self.copies = 0  # host-to-device copies made (one per flush with anything to move)

    def add(self, host: torch.Tensor) -> Staged:
        if host.dtype not in _WIDE:
            raise TypeError(f"staging takes int64, int32, float64 or bool tensors, not {host.dtype}")
        piece = Staged(host.contiguous(), self)
        self._pieces.append(piece)
        return piece

    def flush(self) -> None:
        pieces = [p for p in self._pieces if p._device is None]
        self._pieces = []
        if not pieces:
            return
        if not self.pack:
            for p in pieces:
                p._device = p._host
            return
        flat = [(p._host.view(torch.int64) if p._dtype == torch.float64 else p._host.to(torch.int64)).reshape(-1)
                for p in pieces]
        total = sum(t.numel() for t in flat)
        if self._pinned is not None and self.device.type == "cuda":
            moved = self._pinned.copy(flat, total, self.device)
        else:
            moved = torch.cat(flat).to(self.device)
        self.copies += 1
        offset = 0
        for p, t in zip(pieces, flat):
            part = moved[offset:offset + t.numel()].view(p._host.shape)
            offset += t.numel()
            if p._dtype == torch.float64:
                part = part.view(torch.float64)
            elif p._dtype != torch.int64:
                part = part.to(p._dtype)
            p._device = part


class PinnedBuffers:
    """Two page-locked int64 host buffers, used in turn and grown when a step needs more;
    a buffer is written again only once the copy that last read it has run (its event)."""

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._events: list[object | None] = [None, None]
        self._turn = 0

    def copy(self, parts: list[torch.Tensor], numel: int, device: torch.device) -> torch.Tensor:
        """``parts`` (int64, 1-D) laid end to end in a pinned buffer and copied to ``device``
        (CUDA) without blocking the host."""
        self._turn ^= 1
        turn = self._turn
        if self._events[turn] is not None:
            self._events[turn].synchronize()  # done long ago in practice: a step reads its tokens back
        buf = self._buffers[turn]
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 4096 if buf is None else 2 * buf.numel()), dtype=torch.int64).pin_memory()
            self._buffers[turn] = buf
        host = buf[:numel]
        torch.cat(parts, out=host)
        moved = host.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[turn] = event
        return moved

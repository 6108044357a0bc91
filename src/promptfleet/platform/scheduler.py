"""Continuous-batching scheduler: a bounded FIFO of waiting sequences, a running batch
whose row i lives in KV slot i, and admission bounded by the cache's slots.

The cache holds as many slots as its byte budget allows (``SlotKVCache.for_budget``), each
``cache.max_len`` positions: admission gives a sequence a free slot, which holds every
token it may ever have (prefix + prompt + max_tokens), so a running sequence never has to
be preempted; a request longer than a slot is refused. Finished or cancelled sequences give
their slot back at once, and the last running slot moves into the hole.
"""
from __future__ import annotations

from collections import deque

from promptfleet.platform.kv_cache import SlotKVCache
from promptfleet.platform.sequence import Sequence, SeqStatus


class QueueFullError(RuntimeError):
    """The waiting queue is full: the caller should retry later."""


class RequestTooLargeError(ValueError):
    """The request can never fit (context length or KV budget)."""


class Scheduler:
    def __init__(self, cache: SlotKVCache, *, max_batch_size: int, max_queue: int, max_model_len: int) -> None:
        self.cache = cache
        self.max_batch_size = min(max_batch_size, cache.max_slots)
        # what the cache allocated: every running sequence's tokens fit in it
        self.budget_tokens = self.max_batch_size * cache.max_len
        self.max_queue = max_queue
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved_tokens = 0
        self._reserved: dict[int, int] = {}

    # -- queue
    def check_fits(self, seq: Sequence) -> None:
        rows = 1 if seq.beam is None else len(seq.beam.members)
        if rows > self.max_batch_size:
            raise RequestTooLargeError(f"beam search with {rows} beams needs {rows} batch rows; this server runs "
                                       f"at most {self.max_batch_size} sequences at once")
        total = seq.n_prefix + len(seq.prompt_ids)
        if total >= self.max_model_len:
            raise RequestTooLargeError(
                f"prompt of {len(seq.prompt_ids)} tokens (+{seq.n_prefix} virtual) leaves no room to generate "
                f"within the context of {self.max_model_len} tokens")
        if seq.reserved_tokens(self.max_model_len) > self.cache.max_len:
            raise RequestTooLargeError(
                f"request needs {seq.reserved_tokens(self.max_model_len)} KV tokens; the cache budget "
                f"(kv_cache_bytes) holds {self.cache.max_len} per sequence")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        if len(self.waiting) >= self.max_queue:
            raise QueueFullError(f"the waiting queue is full ({self.max_queue} requests)")
        self.waiting.append(seq)

    # -- admission
    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots while the budget allows (FIFO, no skipping)."""
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            # a beam-search request comes in whole: its head (which holds the prompt) and its other beams
            members = [seq] if seq.beam is None else seq.beam.members
            need = sum(m.reserved_tokens(self.max_model_len) for m in members)
            if len(self.running) + len(members) > self.max_batch_size or self.reserved_tokens + need > self.budget_tokens:
                break
            self.waiting.popleft()
            for m in members:
                m.slot = len(self.running)
                m.status = SeqStatus.RUNNING
                self.running.append(m)
                self._reserved[m.id] = m.reserved_tokens(self.max_model_len)
            self.reserved_tokens += need
            if seq.adapter is not None:  # only the head's slot: the other beams read it there
                self.cache.copy_prefix(seq.slot, seq.adapter)
            seq.cached = seq.n_prefix
            admitted.extend(members)
        return admitted

    # -- release
    def release(self, seq: Sequence) -> None:
        """Free a finished or cancelled sequence's slot and reservation now."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            return
        if seq.slot < 0 or seq.slot >= len(self.running) or self.running[seq.slot] is not seq:
            return
        hole = seq.slot
        last = self.running.pop()
        if last is not seq:
            self.cache.move(last.slot, hole, last.cached, start=last.kv_start)
            last.slot = hole
            self.running[hole] = last
        seq.slot = -1
        self.reserved_tokens -= self._reserved.pop(seq.id, 0)

    def find(self, seq_id: int) -> Sequence | None:
        for seq in self.running:
            if seq.id == seq_id:
                return seq
        for seq in self.waiting:
            if seq.id == seq_id:
                return seq
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

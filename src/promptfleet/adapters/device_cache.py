"""A thread-safe LRU of adapters' KV prefixes under a memory budget.

A miss reads the prefix from the store behind the cache when there is one (``stored``:
the local disk and shared tiers of ``PrefixStore``), without reading the adapter's blob;
else it loads the adapter's weights and builds its prefix (on the model's device). Two
threads missing the same key at once load it once -- the second waits for the first.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from promptfleet.platform.adapter import AdapterPrefix, AdapterWeights

log = logging.getLogger(__name__)

BuildPrefix = Callable[[AdapterWeights, str], AdapterPrefix]


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes_used: int
    budget_bytes: int


@dataclass(frozen=True)
class CacheEntry:
    """One warm prefix: its cache key and the bytes it holds on the device."""
    key: str
    nbytes: int


class _Loading:
    """Per-key lock of an in-flight load, and its result for the threads that waited."""

    __slots__ = ("lock", "waiters", "result")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiters = 0
        self.result: AdapterPrefix | None = None


class AdapterCache:
    def __init__(self, build: BuildPrefix, budget_bytes: int,
                 stored: Callable[[str], AdapterPrefix | None] | None = None) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self._build = build
        self._stored = stored
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, AdapterPrefix] = OrderedDict()
        self._loading: dict[str, _Loading] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.bytes_used = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> AdapterPrefix | None:
        """The cached prefix (counted as a hit and made most recent), or None (not counted)."""
        with self._lock:
            prefix = self._entries.get(key)
            if prefix is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return prefix

    def get_or_load(self, key: str, load_weights: Callable[[], AdapterWeights]) -> AdapterPrefix:
        with self._lock:
            prefix = self._entries.get(key)
            if prefix is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return prefix
            loading = self._loading.get(key)
            if loading is None:
                loading = self._loading[key] = _Loading()
            loading.waiters += 1
        try:
            with loading.lock:
                with self._lock:
                    prefix = self._entries.get(key)
                    if prefix is not None:
                        self._entries.move_to_end(key)
                    else:
                        prefix = loading.result  # loaded by the thread we waited for (maybe uncached)
                    if prefix is not None:
                        self.hits += 1
                        return prefix
                    self.misses += 1
                prefix = self._stored(key) if self._stored is not None else None
                if prefix is None:
                    prefix = self._build(load_weights(), key)
                with self._lock:
                    loading.result = prefix
                    self._insert(key, prefix)
                return prefix
        finally:
            with self._lock:
                loading.waiters -= 1
                if loading.waiters == 0 and self._loading.get(key) is loading:
                    del self._loading[key]

    def _insert(self, key: str, prefix: AdapterPrefix) -> None:
        size = prefix.nbytes
        if size > self.budget_bytes:
            log.warning("adapter prefix %s (%d bytes) is larger than the whole cache budget (%d bytes); "
                        "not cached", key, size, self.budget_bytes)
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes_used -= old.nbytes
        while self._entries and self.bytes_used + size > self.budget_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes_used -= evicted.nbytes
            self.evictions += 1
        self._entries[key] = prefix
        self.bytes_used += size

    def invalidate(self, key: str) -> bool:
        with self._lock:
            prefix = self._entries.pop(key, None)
            if prefix is None:
                return False
            self.bytes_used -= prefix.nbytes
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes_used = 0

    def entries(self) -> list[CacheEntry]:
        """What is warm now, most recently used first (what a router asks to route by)."""
        with self._lock:
            return [CacheEntry(key, prefix.nbytes) for key, prefix in reversed(self._entries.items())]

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(hits=self.hits, misses=self.misses, evictions=self.evictions,
                              entries=len(self._entries), bytes_used=self.bytes_used,
                              budget_bytes=self.budget_bytes)

"""An LRU of finished deterministic generations.

A request is deterministic when it is greedy (temperature 0 or top_k 1) or carries a
seed, and always for beam search. The key holds everything that decides the output: the
tenant, the adapter version (row id and weights sha256; ``base`` for the backbone), the
prompt's token ids, the full ``SamplingParams`` and, for beam search, the beam settings
and the choice's rank -- so entries are never shared across tenants or
adapter versions. Only completions that finished normally are stored.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from promptfleet.platform.sampling import SamplingParams


@dataclass(frozen=True)
class CacheKey:
    tenant_id: str
    model_scope: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    variant: tuple = ()  # beam search: (BeamParams, rank)


@dataclass(frozen=True)
class CachedCompletion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def is_deterministic(params: SamplingParams) -> bool:
    return params.greedy or params.seed is not None


class GenerationCache:
    def __init__(self, capacity: int, *, enabled: bool = True) -> None:
        self.capacity = max(0, int(capacity))
        self.enabled = enabled and self.capacity > 0
        self._entries: OrderedDict[CacheKey, CachedCompletion] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def key(self, *, tenant_id: str, model_scope: str, prompt_ids: list[int],
            params: SamplingParams, variant: tuple = ()) -> CacheKey | None:
        """The cache key of a request, or None when it must not be cached (``variant``
        non-empty: a beam-search choice, deterministic whatever ``params`` say)."""
        if not self.enabled or not (variant or is_deterministic(params)):
            return None
        return CacheKey(tenant_id, model_scope, tuple(prompt_ids), params, variant)

    def get(self, key: CacheKey | None) -> CachedCompletion | None:
        if key is None:
            return None
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: CacheKey | None, value: CachedCompletion) -> None:
        if key is None or value.finish_reason not in ("stop", "length", "repetition"):
            return
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)

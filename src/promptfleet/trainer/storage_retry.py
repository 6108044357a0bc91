"""A worker's blob-storage calls outlast an outage: reading a job's dataset and writing its
adapter are retried with exponential backoff while the store answers ``StorageUnavailable``
(a store that cannot be reached, after the client's own quick retries), for up to a bounded
time (settings ``job_storage_retry_s``). An accepted job therefore finishes once the store is
back instead of failing on a blip; past the bound it fails with a message naming the outage.

Only ``StorageUnavailable`` is retried: a missing or corrupt blob would only fail again."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from promptfleet.adapters.storage import StorageUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class StorageRetry:
    """How long and how often to try again: ``budget_s`` from the first failure, sleeps of
    ``initial_s`` doubling up to ``max_s``."""

    budget_s: float = 300.0
    initial_s: float = 0.5
    max_s: float = 5.0

    def __post_init__(self) -> None:
        if self.budget_s < 0 or self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ValueError(f"invalid storage retry policy {self}")


class StorageRetryStopped(Exception):
    """``should_stop`` said to give up while waiting for the store (cancel, shutdown)."""


def with_storage_retry(fn: Callable[[], T], *, policy: StorageRetry, what: str,
                       should_stop: Callable[[], bool] = lambda: False, between: Callable[[], None] | None = None,
                       wake: threading.Event | None = None, clock: Callable[[], float] = time.monotonic) -> T:
    """``fn()``, tried again while it raises ``StorageUnavailable`` and the budget lasts.

    ``between`` runs before each sleep (a heartbeat, so the job is not taken for dead);
    ``wake`` set ends a sleep early; ``should_stop`` true raises ``StorageRetryStopped``.
    The last ``StorageUnavailable`` is raised once the budget is spent."""
    deadline: float | None = None
    delay = policy.initial_s
    tries = 0
    while True:
        try:
            return fn()
        except StorageUnavailable as exc:
            tries += 1
            now = clock()
            deadline = now + policy.budget_s if deadline is None else deadline
            if now >= deadline:
                log.error("%s: blob storage still unavailable after %d tries over %.0f s; giving up", what, tries,
                          policy.budget_s)
                raise
            wait = min(delay, deadline - now)
            log.warning("%s: blob storage unavailable (try %d), retrying in %.1f s: %s", what, tries, wait, exc)
        if between is not None:
            between()
        if should_stop():
            raise StorageRetryStopped(f"{what}: stopped while waiting for blob storage")
        if wake is not None:
            wake.wait(wait)
        else:
            time.sleep(wait)
        if should_stop():
            raise StorageRetryStopped(f"{what}: stopped while waiting for blob storage")
        delay = min(delay * 2, policy.max_s)

"""Background client threads for load in end-to-end tests: daemon threads, each running
its loop until ``stop()``, which joins them and fails loudly if one hung."""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any


class ClientThreads:
    """Subclasses call ``_spawn`` with ``(target, args)`` pairs; loops check ``_stop``."""

    join_timeout = 90.0

    def _spawn(self, loops: Iterable[tuple[Callable[..., Any], tuple]]) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=fn, args=args, daemon=True) for fn, args in loops]

    def start(self):
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.join_timeout)
        hung = [t.name for t in self._threads if t.is_alive()]
        assert not hung, f"client thread(s) hung past {self.join_timeout:.0f} s: {hung}"

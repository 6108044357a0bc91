"""Clients that do what a load balancer does when a replica dies: send to the first
replica, and on a transport error (refused, reset, the replica died mid-answer) send the
same request to the next. ``FailoverLoad`` runs such clients in threads until stopped and
records every outcome."""
from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from promptfleet.testing.client_threads import ClientThreads


class Failover:
    """One client per replica URL, tried in order for each request."""

    def __init__(self, urls: list[str], key: str, timeout: float = 60) -> None:
        self.clients = [httpx.Client(base_url=u, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)
                        for u in urls]
        self.retries = 0  # requests sent again to the next replica

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        error: httpx.TransportError | None = None
        for c in self.clients:
            try:
                return c.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                error = exc
                self.retries += 1
        assert error is not None
        raise error  # every replica failed: the caller sees it as an outcome of status 0

    def close(self) -> None:
        for c in self.clients:
            c.close()


@dataclass(frozen=True)
class Op:
    """A kind of request a client thread repeats: ``send(lb)`` returns the response;
    ``pause`` seconds between two of them."""

    kind: str
    urls: list[str]                                   # replica order of this client
    send: Callable[[Failover], httpx.Response]
    pause: float = 0.0


class FailoverLoad(ClientThreads):
    """One thread per ``Op`` until ``stop()``; outcomes are ``(time, kind, status)``,
    status 0 when every replica failed at the transport level."""

    def __init__(self, ops: list[Op], key: str) -> None:
        self.key = key
        self.outcomes: list[tuple[float, str, int]] = []
        self.retries = 0
        self._spawn((self._run, (op,)) for op in ops)

    def _run(self, op: Op) -> None:
        lb = Failover(op.urls, self.key)
        try:
            while not self._stop.is_set():
                try:
                    status = op.send(lb).status_code
                except httpx.TransportError:
                    status = 0
                with self._lock:
                    self.outcomes.append((time.monotonic(), op.kind, status))
                self._stop.wait(op.pause)
        finally:
            with self._lock:
                self.retries += lb.retries
            lb.close()

    def ok_after(self, t: float) -> set[str]:
        """Kinds that got a 2xx after ``t``."""
        with self._lock:
            return {k for at, k, s in self.outcomes if at > t and 200 <= s < 300}

    def statuses(self) -> Counter:
        with self._lock:
            return Counter((k, s) for _, k, s in self.outcomes)


"""Waiting for a state instead of sleeping: poll a predicate until it holds, or fail
loudly (naming what was awaited) once a generous deadline has passed."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class _Poll(Generic[T]):
    """One predicate against one deadline; ``check()`` is (held, value) or raises."""

    def __init__(self, predicate: Callable[[], T], timeout: float, what: str,
                 on_timeout: Callable[[], str] | None) -> None:
        self.predicate, self.timeout, self.what, self.on_timeout = predicate, timeout, what, on_timeout
        self.deadline = time.monotonic() + timeout

    def check(self) -> tuple[bool, T]:
        value = self.predicate()
        if value:
            return True, value
        if time.monotonic() > self.deadline:
            extra = self.on_timeout() if self.on_timeout else ""
            raise AssertionError(f"timed out after {self.timeout:g} s waiting for {self.what}\n{extra}".rstrip())
        return False, value


def wait_for(predicate: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.05, what: str = "condition",
             on_timeout: Callable[[], str] | None = None) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); raise
    ``AssertionError`` after ``timeout`` seconds."""
    poll = _Poll(predicate, timeout, what, on_timeout)
    while not (result := poll.check())[0]:
        time.sleep(interval)
    return result[1]


async def wait_for_async(predicate: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.01,
                         what: str = "condition", on_timeout: Callable[[], str] | None = None) -> T:
    """``wait_for`` inside an event loop: sleeps with ``asyncio.sleep`` so the loop runs."""
    poll = _Poll(predicate, timeout, what, on_timeout)
    while not (result := poll.check())[0]:
        await asyncio.sleep(interval)
    return result[1]

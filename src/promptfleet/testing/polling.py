"""Waiting for a state instead of sleeping: poll a predicate until it holds, or fail
loudly (naming what was awaited) once a generous deadline has passed."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _timed_out(timeout: float, what: str, on_timeout: Callable[[], str] | None) -> AssertionError:
    extra = on_timeout() if on_timeout else ""
    return AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{extra}".rstrip())


def wait_for(predicate: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.05, what: str = "condition",
             on_timeout: Callable[[], str] | None = None) -> T:
    """Poll ``predicate`` until it returns something truthy (returned); raise
    ``AssertionError`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what, on_timeout)
        time.sleep(interval)


async def wait_for_async(predicate: Callable[[], T], *, timeout: float = 60.0, interval: float = 0.01,
                         what: str = "condition", on_timeout: Callable[[], str] | None = None) -> T:
    """``wait_for`` inside an event loop: sleeps with ``asyncio.sleep`` so the loop runs."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(timeout, what, on_timeout)
        await asyncio.sleep(interval)

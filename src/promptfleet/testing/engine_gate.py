"""Hold an engine between steps, so a test can look at a state instead of racing it.

``StepGate(engine)`` wraps the instance's ``step``: while the gate is closed, the engine
thread waits before each step until the test allows more (``allow(n)``) or opens the gate.
Requests submitted meanwhile queue as they would behind a slow step, so "the first request
is still running when the next ones arrive" holds by construction, however loaded the
machine. Leaving the ``with`` block opens the gate and restores ``step``."""
from __future__ import annotations

import threading
from types import TracebackType
from typing import Any


class StepGate:
    def __init__(self, engine: Any, *, closed: bool = True, allow: int = 0, timeout: float = 300.0) -> None:
        self.engine = engine
        self.timeout = timeout
        self.steps = 0  # steps the engine has run through the gate
        self._cond = threading.Condition()
        self._open = not closed
        self._allowed = allow
        self._waiting = False
        self._real_step = engine.step
        self._patched_instance = "step" in vars(engine)

    def _step(self) -> None:
        with self._cond:
            self._waiting = True
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._open or self._allowed > 0, timeout=self.timeout):
                self._open = True  # never wedge the engine past the deadline; the test fails on its own waits
            if not self._open:
                self._allowed -= 1
            self._waiting = False
        self._real_step()
        with self._cond:
            self.steps += 1
            self._cond.notify_all()

    def allow(self, n: int = 1) -> None:
        """Let ``n`` more steps run while the gate stays closed."""
        with self._cond:
            self._allowed += n
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._open, self._allowed = False, 0

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    @property
    def held(self) -> bool:
        """The engine thread is waiting at the closed gate with no step allowed."""
        with self._cond:
            return self._waiting and not self._open and self._allowed == 0

    def wait_held(self, timeout: float = 60.0) -> None:
        """Block until the engine thread is waiting at the closed gate (it has run every
        step it was allowed and has work for another)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._waiting and not self._open and self._allowed == 0,
                                       timeout=timeout):
                raise AssertionError(f"the engine did not reach the closed gate within {timeout:g} s")

    def __enter__(self) -> "StepGate":
        self.engine.step = self._step
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.open()
        if self._patched_instance:
            self.engine.step = self._real_step
        else:
            del self.engine.step

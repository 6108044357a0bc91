"""A tqdm progress bar that follows a training job until it finishes (CLI and API client)."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

FINAL = ("succeeded", "failed", "cancelled")


def _postfix(status: dict[str, Any]) -> str:
    parts = [str(status.get("status", "?"))]
    losses = (status.get("metrics") or {}).get("loss") or []
    if losses:
        parts.append(f"loss={losses[-1]:.4f}")
    return " ".join(parts)


def watch_job(get_status: Callable[[], dict[str, Any]], *, interval: float = 1.0, out: TextIO | None = None,
              timeout: float | None = None) -> dict[str, Any]:
    """Poll ``get_status()`` (a ``GET /v1/jobs/{id}`` body) every ``interval`` seconds, drawing
    steps done out of ``total_steps``, until the job is final; returns the last status.
    ``TimeoutError`` after ``timeout`` seconds if given."""
    out = out if out is not None else sys.stderr
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=None, unit="step", file=out, dynamic_ncols=True, leave=True)
    try:
        while True:
            status = get_status()
            total = status.get("total_steps")
            if total and bar.total != total:
                bar.total = int(total)
            step = int(status.get("step") or 0)
            if status.get("status") == "succeeded" and bar.total:
                step = bar.total
            if step != bar.n:
                bar.n = step
            bar.set_postfix_str(_postfix(status), refresh=False)
            bar.refresh()
            if status.get("status") in FINAL:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job still {status.get('status')} after {timeout} s")
            time.sleep(interval)
    finally:
        bar.close()

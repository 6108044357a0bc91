"""A tqdm progress bar that follows a training job until it finishes (CLI and API client),
with a line above it for the zero-shot evaluation and for each epoch as they arrive."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

FINAL = ("succeeded", "failed", "cancelled")


def _postfix(status: dict[str, Any]) -> str:
    parts = [str(status.get("status", "?"))]
    metrics = status.get("metrics") or {}
    losses = metrics.get("loss") or []
    if losses:
        parts.append(f"loss={losses[-1]:.4f}")
    epochs = metrics.get("epochs") or []
    if epochs and "val_accuracy" in epochs[-1]:
        parts.append(f"val_acc={epochs[-1]['val_accuracy']:.1%}")
    return " ".join(parts)


def _fmt(value: Any, pattern: str) -> str:
    return format(value, pattern) if isinstance(value, (int, float)) else "-"


def evaluation_lines(metrics: dict[str, Any]) -> list[str]:
    """One line for the zero-shot evaluation and one per epoch (train loss, validation
    loss, validation exact-match accuracy)."""
    lines = []
    zero = metrics.get("zero_shot")
    if zero:
        lines.append(f"zero-shot  val_loss {_fmt(zero.get('val_loss'), '.4f')}  "
                     f"val_accuracy {_fmt(zero.get('val_accuracy'), '.1%')}")
    for e in metrics.get("epochs") or []:
        line = f"epoch {e.get('epoch', '?'):>3}  train_loss {_fmt(e.get('train_loss'), '.4f')}"
        if "val_loss" in e:
            line += f"  val_loss {_fmt(e.get('val_loss'), '.4f')}  val_accuracy {_fmt(e.get('val_accuracy'), '.1%')}"
        lines.append(line)
    if metrics.get("stopped_early"):
        lines.append(f"stopped early; kept epoch {metrics.get('best_epoch')}")
    decoding = metrics.get("decoding")
    if decoding:
        tried = ", ".join(f"{t.get('name')} {_fmt(t.get('accuracy'), '.1%')}" for t in decoding.get("tried") or [])
        lines.append(f"decoding on {decoding.get('examples', '?')} validation examples: {tried}")
        lines.append(f"-> generation defaults {json.dumps(decoding.get('best'))}")
    return lines


def watch_job(get_status: Callable[[], dict[str, Any]], *, interval: float = 1.0, out: TextIO | None = None,
              timeout: float | None = None) -> dict[str, Any]:
    """Poll ``get_status()`` (a ``GET /v1/jobs/{id}`` body) every ``interval`` seconds, drawing
    steps done out of ``total_steps``, until the job is final; returns the last status.
    ``TimeoutError`` after ``timeout`` seconds if given."""
    out = out if out is not None else sys.stderr
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = tqdm(total=None, unit="step", file=out, dynamic_ncols=True, leave=True)
    shown = 0  # evaluation lines already written above the bar
    try:
        while True:
            status = get_status()
            lines = evaluation_lines(status.get("metrics") or {})
            for line in lines[shown:]:
                bar.write(line, file=out)
            shown = max(shown, len(lines))
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

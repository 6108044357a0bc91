"""Strict JSON for uploads (adapter configs, dataset lines): no NaN/Infinity and no number
that overflows a float. Callers map the parser's failures (``json.JSONDecodeError``,
``RecursionError`` for deep nesting, ``ValueError`` for the rest, e.g. an integer over
Python's 4300-digit limit) to their own refusal."""
from __future__ import annotations

import json
import math
from typing import Any


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]}{'...' if len(text) > 32 else ''} is out of range")
    return value


def strict_loads(text: str) -> Any:
    """``json.loads`` refusing NaN, Infinity and numbers that overflow to them."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)

"""Training datasets: JSONL, one ``{"prompt": str, "completion": str}`` object per line.

Every refusal names the 1-based line it found: ``DatasetError(line, reason)`` reads
"line N: reason" (an empty file is refused at line 1).
The completion gets the tokenizer's EOS appended, so a trained adapter learns to stop.

A dataset is read line by line and each line is bounded before it is decoded, parsed or
tokenized (``max_line_bytes``), and the example count is checked while streaming, so a
hostile upload (one 8 MiB line, deep nesting, a 5000-digit number) is a ``DatasetError``
in milliseconds, never a crash or a tokenizer run over megabytes.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from promptfleet.strict_json import strict_loads

MAX_LINE_REASON = 200
DEFAULT_MAX_LINE_BYTES = 64 << 10


class DatasetError(ValueError):
    """A dataset that cannot be used; ``line`` is 1-based."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"line {line}: {reason}")


@dataclass(frozen=True)
class DatasetLimits:
    """Bounds on an uploaded dataset (``from_settings`` reads ``max_dataset_mb`` and
    ``max_dataset_line_kb``)."""

    max_bytes: int = 32 << 20
    max_examples: int = 100_000
    max_example_tokens: int = 512
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES

    @classmethod
    def from_settings(cls, settings: Any, **overrides: int) -> "DatasetLimits":
        values = {"max_bytes": int(settings.max_dataset_mb) << 20,
                  "max_line_bytes": int(settings.max_dataset_line_kb) << 10}
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]  # ends with EOS

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def _field(obj: dict, name: str, line: int) -> str:
    if name not in obj:
        raise DatasetError(line, f'missing field "{name}"')
    value = obj[name]
    if not isinstance(value, str):
        raise DatasetError(line, f'field "{name}" must be a string, got {type(value).__name__}')
    return value


def _loads(text: str, line: int) -> Any:
    """Strict JSON: no NaN/Infinity or overflowing numbers; every parser failure (deep
    nesting, an integer over Python's 4300-digit limit) a ``DatasetError``."""
    try:
        return strict_loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(line, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise DatasetError(line, "invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise DatasetError(line, f"invalid JSON: {str(exc)[:MAX_LINE_REASON]}") from None


def _parse_line(text: str, line: int) -> tuple[str, str]:
    obj = _loads(text, line)
    if not isinstance(obj, dict):
        raise DatasetError(line, f'expected a JSON object with "prompt" and "completion", got {type(obj).__name__}')
    extra = sorted(set(obj) - {"prompt", "completion"})
    if extra:
        shown = ", ".join(json.dumps(k) for k in extra)[:MAX_LINE_REASON]
        raise DatasetError(line, f"unexpected field(s) {shown}; only \"prompt\" and \"completion\" are allowed")
    prompt = _field(obj, "prompt", line)
    completion = _field(obj, "completion", line)
    if not completion.strip():
        raise DatasetError(line, '"completion" is empty')
    return prompt, completion


def _kib(n: int) -> str:
    return f"{n} bytes ({n / 1024:g} KiB)" if n >= 1024 else f"{n} bytes"


def iter_lines(data: bytes, *, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each JSONL line, without its ``\\n``/``\\r\\n``; a line over
    ``max_line_bytes`` is refused before it is copied or decoded. A leading UTF-8 BOM is
    dropped; a final newline ends the last line (it does not start an empty one)."""
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    number = 0
    while start < len(data):
        number += 1
        end = data.find(b"\n", start)
        stop = len(data) if end < 0 else end
        if stop > start and data[stop - 1] == 0x0D:  # CRLF
            stop -= 1
        if stop - start > max_line_bytes:
            raise DatasetError(number, f"line is {_kib(stop - start)} long, over the limit of "
                                       f"{_kib(max_line_bytes)} per line")
        raw = data[start:stop]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(number, f"not valid UTF-8 (byte offset {start + exc.start})") from None
        yield number, text
        if end < 0:
            break
        start = end + 1


def parse_dataset(data: bytes, *, tokenizer: Any, max_example_tokens: int, max_examples: int,
                  max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[Example]:
    """Parse and tokenize a JSONL dataset, refusing the first bad line with its number."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    examples: list[Example] = []
    for number, raw in iter_lines(data, max_line_bytes=max_line_bytes):
        if not raw.strip():
            raise DatasetError(number, "blank line (only a trailing newline is allowed)")
        if len(examples) >= max_examples:
            raise DatasetError(number, f"too many examples (at most {max_examples})")
        prompt, completion = _parse_line(raw, number)
        prompt_ids = tuple(_encode(tokenizer, prompt, number)) if prompt else ()
        completion_ids = tuple(_encode(tokenizer, completion, number)) + (int(eos),)
        count = len(prompt_ids) + len(completion_ids)
        if count > max_example_tokens:
            raise DatasetError(number, f"example has {count} tokens (prompt {len(prompt_ids)} + completion "
                                       f"{len(completion_ids)} incl. EOS), more than the limit of "
                                       f"{max_example_tokens}")
        examples.append(Example(prompt=prompt, completion=completion, prompt_ids=prompt_ids,
                                completion_ids=completion_ids))
    if not examples:
        raise DatasetError(1, "the dataset holds no examples")
    return examples


def _encode(tokenizer: Any, text: str, line: int) -> list[int]:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\\ud800" escape: no tokenizer takes it
        raise DatasetError(line, "a string holds a lone UTF-16 surrogate escape (e.g. \\ud800), "
                                 "which is not valid Unicode text") from None
    return tokenizer.encode(text)

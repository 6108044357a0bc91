"""Training datasets: JSONL, one ``{"prompt": str, "completion": str}`` object per line.

Every refusal names the 1-based line it found: ``DatasetError(line, reason)`` reads
"line N: reason" (an empty file is refused at line 1).
The completion gets the tokenizer's EOS appended, so a trained adapter learns to stop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MAX_LINE_REASON = 200


class DatasetError(ValueError):
    """A dataset that cannot be used; ``line`` is 1-based."""

    def __init__(self, line: int, reason: str) -> None:
        self.line = line
        self.reason = reason
        super().__init__(f"line {line}: {reason}")


@dataclass(frozen=True)
class DatasetLimits:
    """Bounds on an uploaded dataset (``from_settings`` reads ``max_dataset_mb``)."""

    max_bytes: int = 32 << 20
    max_examples: int = 100_000
    max_example_tokens: int = 512

    @classmethod
    def from_settings(cls, settings: Any, **overrides: int) -> "DatasetLimits":
        values = {"max_bytes": int(settings.max_dataset_mb) << 20}
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


def _parse_line(text: str, line: int) -> tuple[str, str]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(line, f"invalid JSON: {exc.msg} (column {exc.colno})") from None
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


def parse_dataset(data: bytes, *, tokenizer: Any, max_example_tokens: int, max_examples: int) -> list[Example]:
    """Parse and tokenize a JSONL dataset, refusing the first bad line with its number."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise DatasetError(line, f"not valid UTF-8 (byte offset {exc.start})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the trailing newline
    lines = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token")
    examples: list[Example] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            raise DatasetError(number, "blank line (only a trailing newline is allowed)")
        if len(examples) >= max_examples:
            raise DatasetError(number, f"too many examples (at most {max_examples})")
        prompt, completion = _parse_line(raw, number)
        prompt_ids = tuple(tokenizer.encode(prompt)) if prompt else ()
        completion_ids = tuple(tokenizer.encode(completion)) + (int(eos),)
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

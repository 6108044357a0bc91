"""Datasets are bounded line by line before anything is parsed or tokenized, and JSON that
breaks parsers is a ``DatasetError`` naming its line, never a crash.

The hostile datasets are built here; the measured refusals run in a fresh subprocess (wall
time of the call, and growth of the peak RSS -- the kernel's high-water mark, reset just
before the call -- which counts the tokenizer's native allocations that tracemalloc misses)
and must take < 1 s and < 64 MiB.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.testing.hostile import measure_refusal
from promptfleet.trainer.datasets import DEFAULT_MAX_LINE_BYTES, DatasetError, DatasetLimits, parse_dataset

MAX_SECONDS = 1.0
MAX_GROWTH_MIB = 64.0


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def parse(data: bytes, tok, **kw):
    args = {"max_example_tokens": 512, "max_examples": 100_000, **kw}
    return parse_dataset(data, tokenizer=tok, **args)


def good_line(i: int = 0) -> bytes:
    return json.dumps({"prompt": f"question {i}:", "completion": f" answer {i}"}).encode()


def one_huge_line(size: int = 8 << 20) -> bytes:
    """One JSONL line of ``size`` bytes: a valid example whose prompt is ``size`` letters."""
    head, tail = b'{"prompt": "', b'", "completion": " ok"}'
    return head + b"a" * (size - len(head) - len(tail)) + tail + b"\n"


def with_raw_value(raw: bytes, field: str = "prompt") -> bytes:
    line = json.dumps({"prompt": "@@", "completion": " ok"}).encode()
    if field == "completion":
        line = json.dumps({"prompt": "p", "completion": "@@"}).encode()
    return good_line() + b"\n" + line.replace(b'"@@"', raw) + b"\n"


# --- measuring a refusal in a fresh process (promptfleet.testing.hostile) ----------------

DATASET_SETUP = """
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.trainer.datasets import parse_dataset
tok = load_tokenizer(None)
tok.encode("warm up the tokenizer")
"""


def measure(data: bytes, tmp_path: Path, *, max_examples: int = 100_000) -> dict:
    call = f"parse_dataset(data, tokenizer=tok, max_example_tokens=512, max_examples={max_examples})"
    return measure_refusal(data, tmp_path, setup=DATASET_SETUP, call=call, env={"TOKENIZERS_PARALLELISM": "false"})


def test_one_8_mib_line_is_refused_fast_and_small(tmp_path):
    data = one_huge_line()
    assert len(data) == (8 << 20) + 1 and data.count(b"\n") == 1
    result = measure(data, tmp_path)
    assert result["refusal"] == ["DatasetError", "line 1: line is 8388608 bytes (8192 KiB) long, over the limit "
                                                 "of 65536 bytes (64 KiB) per line"]
    assert result["seconds"] < MAX_SECONDS, result
    assert result["growth_mib"] < MAX_GROWTH_MIB, result


def test_example_count_is_checked_while_streaming(tmp_path):
    """A million short lines against a limit of 100: refused at line 101, without first
    decoding and splitting the 30 MB file."""
    data = b"\n".join(good_line(i % 10) for i in range(1_000_000)) + b"\n"
    result = measure(data, tmp_path, max_examples=100)
    assert result["refusal"] == ["DatasetError", "line 101: too many examples (at most 100)"]
    assert result["seconds"] < MAX_SECONDS, result
    assert result["growth_mib"] < MAX_GROWTH_MIB, result


def test_line_limit_is_a_setting(tok):
    line = one_huge_line(100 << 10)
    with pytest.raises(DatasetError, match=r"^line 1: line is 102400 bytes .* over the limit of 65536 bytes"):
        parse(line, tok)
    with pytest.raises(DatasetError, match=r"more than the limit of 512"):  # tokenized once the line fits
        parse(line, tok, max_line_bytes=128 << 10)
    assert DatasetLimits().max_line_bytes == DEFAULT_MAX_LINE_BYTES == 64 << 10
    settings = type("S", (), {"max_dataset_mb": 32, "max_dataset_line_kb": 8})()
    assert DatasetLimits.from_settings(settings).max_line_bytes == 8 << 10
    # the limit is on the line's bytes, not counting its CRLF
    exact = json.dumps({"prompt": "x" * 100, "completion": " y"}).encode()
    assert len(parse(exact + b"\r\n", tok, max_line_bytes=len(exact))) == 1
    with pytest.raises(DatasetError, match="^line 2: line is"):
        parse(exact + b"\n" + exact + b"z\n", tok, max_line_bytes=len(exact))


HOSTILE_LINES = {
    "100000 nested arrays (over the line limit)": (b"[" * 100_000 + b"\n", {}, "over the limit of 65536 bytes"),
    "100000 nested arrays": (b"[" * 100_000 + b"]" * 100_000 + b"\n", {"max_line_bytes": 1 << 20},
                             "invalid JSON: nested too deeply"),
    "60000 nested objects": (b'{"a":' * 60_000 + b"1" + b"}" * 60_000 + b"\n", {"max_line_bytes": 1 << 20},
                             "invalid JSON: nested too deeply"),
    "5000-digit integer": (with_raw_value(b"7" * 5000), {}, "invalid JSON: Exceeds the limit (4300 digits)"),
    "huge float": (with_raw_value(b"1e999999"), {}, "invalid JSON: number 1e999999 is out of range"),
    "5000-digit float": (with_raw_value(b"9" * 5000 + b".5", "completion"), {}, "out of range"),
    "5000-digit fraction": (with_raw_value(b"0." + b"3" * 5000, "completion"), {}, "must be a string, got float"),
    "NaN": (with_raw_value(b"NaN"), {}, "invalid JSON: NaN is not valid JSON"),
    "Infinity": (with_raw_value(b"Infinity"), {}, "invalid JSON: Infinity is not valid JSON"),
    "not UTF-8": (good_line() + b'\n{"prompt": "caf\xe9", "completion": " x"}\n', {}, "not valid UTF-8"),
    "lone surrogate escape": (with_raw_value(b'"\\ud800"'), {}, "lone UTF-16 surrogate"),
}


@pytest.mark.parametrize("case", list(HOSTILE_LINES))
def test_hostile_json_is_a_dataset_error_naming_its_line(case, tok):
    data, kw, fragment = HOSTILE_LINES[case]
    with pytest.raises(DatasetError) as info:
        parse(data, tok, **kw)
    line = 1 if data.count(b"\n") == 1 else 2
    assert info.value.line == line and str(info.value).startswith(f"line {line}: ")
    assert fragment in str(info.value), str(info.value)


def test_legitimate_datasets_still_parse(tok):
    crlf_bom = b"\xef\xbb\xbf" + good_line(1) + b"\r\n" + good_line(2)  # BOM, CRLF, no final newline
    assert [e.prompt for e in parse(crlf_bom, tok)] == ["question 1:", "question 2:"]
    unicode = json.dumps({"prompt": "naïve café — 東京 🙂", "completion": " ✓"}, ensure_ascii=False).encode()
    assert parse(unicode + b"\n", tok)[0].completion == " ✓"
    near_limit = one_huge_line(DEFAULT_MAX_LINE_BYTES).rstrip(b"\n")
    with pytest.raises(DatasetError, match="example has"):  # fits the line limit, refused by the token limit
        parse(near_limit, tok)
    assert len(parse(near_limit, tok, max_example_tokens=100_000)) == 1

"""Dataset parsing: every refusal names its line."""
from __future__ import annotations

import json

import pytest

from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.trainer.datasets import DatasetError, parse_dataset


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _jsonl(*objs) -> bytes:
    return ("\n".join(json.dumps(o) for o in objs) + "\n").encode()


def parse(data: bytes, tok, max_tokens: int = 64, max_examples: int = 100):
    return parse_dataset(data, tokenizer=tok, max_example_tokens=max_tokens, max_examples=max_examples)


def test_parses_and_appends_eos(tok):
    data = _jsonl({"prompt": "Hello", "completion": " world"}, {"prompt": "", "completion": "x"})
    examples = parse(data, tok)
    assert len(examples) == 2
    assert examples[0].prompt_ids == tuple(tok.encode("Hello"))
    assert examples[0].completion_ids == tuple(tok.encode(" world")) + (tok.eos_token_id,)
    assert examples[1].prompt_ids == ()
    # no trailing newline, CRLF line ends
    assert len(parse(b'{"prompt": "a", "completion": "b"}\r\n{"prompt": "c", "completion": "d"}', tok)) == 2


@pytest.mark.parametrize("data, line, fragment", [
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": \n', 2, "invalid JSON"),
    (b'{"prompt": "a", "completion": "b"}\n[1, 2]\n', 2, "JSON object"),
    (b'"just a string"\n', 1, "JSON object"),
    (b'{"prompt": "a"}\n', 1, 'missing field "completion"'),
    (b'{"completion": "a"}\n', 1, 'missing field "prompt"'),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "b"}\n', 2, '"prompt" must be a string'),
    (b'{"prompt": "a", "completion": null}\n', 1, '"completion" must be a string'),
    (b'{"prompt": "a", "completion": "b", "extra": 1}\n', 1, "unexpected field"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": ""}\n', 2, "empty"),
    (b'{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": "b"}\n', 2, "blank line"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n\n', 3, "blank line"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n', 2, "UTF-8"),
    (b"", 1, "no examples"),
])
def test_refusals_name_the_line(tok, data, line, fragment):
    with pytest.raises(DatasetError) as info:
        parse(data, tok)
    assert info.value.line == line
    assert str(info.value).startswith(f"line {line}: ")
    assert fragment in str(info.value)


def test_token_and_count_limits(tok):
    long = _jsonl({"prompt": "a", "completion": "b"}, {"prompt": "word " * 40, "completion": "b"})
    with pytest.raises(DatasetError, match=r"^line 2: example has \d+ tokens .* limit of 16"):
        parse(long, tok, max_tokens=16)
    many = _jsonl(*[{"prompt": "a", "completion": "b"}] * 4)
    with pytest.raises(DatasetError, match="^line 4: too many examples"):
        parse(many, tok, max_examples=3)
    assert len(parse(many, tok, max_examples=4)) == 4

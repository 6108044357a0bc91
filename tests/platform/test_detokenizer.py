"""The incremental detokenizer against the reference: a full decode of all tokens so far,
with the real GPT-2 BPE (byte-level: emoji and CJK characters span several tokens)."""
from __future__ import annotations

import random

import pytest

from promptfleet.platform.detokenizer import IncrementalDetokenizer
from promptfleet.platform.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def decode(tok):
    return lambda ids: tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def stream(decode, ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(decode)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.finish())
    return deltas, detok.text


@pytest.mark.parametrize("text", [
    "Hello world, plain ASCII.",
    "naïve café — “quotes” and 日本語のテキスト 🎉🚀 mixed with ASCII",
    "🙂" * 5 + "end",
    "<|endoftext|> special token in the middle",
])
def test_valid_text_streams_exactly_and_never_emits_a_partial_character(tok, decode, text):
    ids = tok.encode(text)
    deltas, final = stream(decode, ids)
    assert final == "".join(deltas) == decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    # after each token, the text so far is a prefix of the final text
    detok = IncrementalDetokenizer(decode)
    for t in ids:
        detok.add(t)
        assert text.startswith(detok.text)


def test_a_multi_byte_character_is_held_until_complete(tok, decode):
    ids = tok.encode("🎉")
    assert len(ids) > 1  # GPT-2 splits this emoji into byte tokens
    detok = IncrementalDetokenizer(decode)
    assert [detok.add(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == "🎉"


def test_a_partial_character_at_the_end_comes_out_as_the_full_decode_does(tok, decode):
    ids = tok.encode("ok 🎉")[:-1]
    detok = IncrementalDetokenizer(decode)
    for t in ids:
        detok.add(t)
    assert detok.text.startswith("ok") and "\ufffd" not in detok.text  # the space may ride on the first byte
    detok.finish()
    assert detok.text == decode(ids) and detok.text.endswith("\ufffd")


def test_random_token_streams_match_the_full_decode(tok, decode):
    """Random ids, as a random-weight model emits them: invalid UTF-8 byte runs included."""
    rng = random.Random(0)
    byte_tokens = [t for t in range(len(tok)) if "\ufffd" in decode([t])]  # lone bytes of multi-byte chars
    assert len(byte_tokens) > 50
    for _ in range(200):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.5 else rng.randrange(50257)
               for _ in range(rng.randrange(1, 40))]
        deltas, final = stream(decode, ids)
        assert final == "".join(deltas) == decode(ids), ids

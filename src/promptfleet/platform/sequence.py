"""One request's state inside the engine: tokens, text, stop conditions, output deltas."""
from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from promptfleet.platform.adapter import AdapterPrefix
from promptfleet.platform.config import RepetitionConfig
from promptfleet.platform.detokenizer import IncrementalDetokenizer
from promptfleet.platform.sampling import SamplerRow, SamplingParams

if TYPE_CHECKING:
    from promptfleet.platform.beam_group import BeamGroup

_ids = itertools.count(1)


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class CompletionDelta:
    """What a step produced for one request; the last one carries ``finish_reason``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    error_code: str | None = None  # with ``error``: a short machine-readable reason


def find_repetition(tokens: list[int], cfg: RepetitionConfig) -> int | None:
    """If the tail of ``tokens`` is one n-gram repeated, the index where the repeats begin."""
    for n in range(1, cfg.max_ngram + 1):
        reps = max(cfg.min_repeats, -(-cfg.min_span // n))
        span = reps * n
        if len(tokens) < span:
            break
        tail = tokens[-span:]
        unit = tail[-n:]
        if tail == unit * reps:
            return len(tokens) - span
    return None


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterPrefix | None
    emit: Callable[[CompletionDelta], None]
    detokenize: Callable[[list[int]], str]
    eos_token_ids: tuple[int, ...]  # any of them ends the sequence (Llama-3-style models have several)
    repetition: RepetitionConfig
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    slot: int = -1
    cached: int = 0  # tokens whose K/V are in this sequence's slot
    beam: "BeamGroup | None" = None  # the beam-search request this sequence is a beam of
    kv_start: int = 0  # first position its own slot holds (a beam reads the prompt from its head's)
    generator: torch.Generator | None = None
    _text: str = ""
    _sent_chars: int = 0
    _sent_tokens: int = 0

    def __post_init__(self) -> None:
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(int(self.params.seed))
        self._detok = IncrementalDetokenizer(self.detokenize)

    @property
    def n_prefix(self) -> int:
        return 0 if self.adapter is None else self.adapter.num_virtual_tokens

    def reserved_tokens(self, max_model_len: int) -> int:
        """KV tokens this sequence may ever hold (admission reserves them all)."""
        return min(self.n_prefix + len(self.prompt_ids) + self.params.max_tokens, max_model_len)

    def sampler_row(self) -> SamplerRow:
        history = self.prompt_ids + self.output_ids if self.params.repetition_penalty != 1.0 else []
        return SamplerRow(self.params, history, self.generator)

    def append(self, token: int, max_model_len: int) -> None:
        """Add a sampled token and decide whether the sequence is finished."""
        p = self.params
        if token in self.eos_token_ids and not p.ignore_eos:
            self._finish("stop")
            return
        self.output_ids.append(token)
        old_len = len(self._text)
        self._text += self._detok.add(token)
        if p.stop and len(self._text) > old_len:
            # only a stop string that ends in the new text can be new
            start = max(0, old_len - max(map(len, p.stop)) + 1)
            hits = [i for i in (self._text.find(s, start) for s in p.stop) if i >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                self._finish("stop", release_text=False)
                return
        detect = self.repetition.enabled if p.detect_repetition is None else p.detect_repetition
        if detect:
            cut = find_repetition(self.output_ids, self.repetition)
            if cut is not None:
                self._finish("repetition")
                return
        if len(self.output_ids) >= p.max_tokens or self.n_prefix + len(self.prompt_ids) + len(self.output_ids) >= max_model_len:
            self._finish("length")

    def _finish(self, reason: str, *, release_text: bool = True) -> None:
        if release_text:  # a partial character at the end comes out as U+FFFD, as in a full decode
            self._text += self._detok.finish()
        self.finish_reason = reason
        self.status = SeqStatus.FINISHED

    def flush(self) -> None:
        """Send the text produced since the last delta (holding back a partial stop string
        or an incomplete UTF-8 character while the sequence is still running)."""
        finished = self.status is SeqStatus.FINISHED
        upto = len(self._text)
        if not finished:
            upto -= _held_back(self._text, self.params.stop)
        if upto < self._sent_chars:
            upto = self._sent_chars
        text = self._text[self._sent_chars:upto]
        tokens = self.output_ids[self._sent_tokens:]
        if not text and not tokens and not finished:
            return
        self._sent_chars, self._sent_tokens = upto, len(self.output_ids)
        self.emit(CompletionDelta(text=text, token_ids=tokens, finish_reason=self.finish_reason if finished else None,
                                  prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.output_ids)))

    def fail(self, message: str, *, code: str = "engine_error") -> None:
        self._finish("error")
        self.emit(CompletionDelta(text="", token_ids=[], finish_reason="error", prompt_tokens=len(self.prompt_ids),
                                  completion_tokens=len(self.output_ids), error=message, error_code=code))


"""One beam-search request inside the engine: ``k`` beam sequences in ``k`` KV slots.

The head beam is submitted like any request: its slot gets the adapter's virtual tokens
and its prompt is prefilled (chunked, batched with everyone else's work). From its last
prompt position the search starts: ``k`` beams, every one reading the prompt's K/V from
the head's slot (``beam_attention.BeamBatch``), each writing its own generated tokens at
positions ``shared ..`` of its own slot. When beams fork (two of the next step's beams
extend the same parent), the first child keeps the parent's slot and the other gets a copy
of the parent's own tokens only, into the slot of a beam that had no child: the prompt is
never copied, and a step whose beams each extend a different parent copies nothing.

Deltas: none while searching (the ranking can change until the end); the best
``num_return`` finished beams come out together, as one list, when the search ends.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from promptfleet.platform.adapter import AdapterPrefix
from promptfleet.platform.beam_search import BeamParams, BeamSearch, Continuation, Hypothesis, beam_ends, cut_at_stop
from promptfleet.platform.config import RepetitionConfig
from promptfleet.platform.kv_cache import SlotKVCache
from promptfleet.platform.sampling import SamplingParams, apply_repetition_penalty
from promptfleet.platform.sequence import CompletionDelta, Sequence, SeqStatus


@dataclass
class BeamGroup:
    members: list[Sequence]  # members[0] is the head: its slot holds the shared prompt
    search: BeamSearch
    emit: Callable[[list[CompletionDelta]], None]
    detokenize: Callable[[list[int]], str]
    running: list[Sequence] | None = None  # search beam i -> the member whose slot holds its tokens
    finished: bool = False

    @classmethod
    def create(cls, *, prompt_ids: list[int], params: SamplingParams, beam: BeamParams, adapter: AdapterPrefix | None,
               emit: Callable[[list[CompletionDelta]], None], detokenize: Callable[[list[int]], str],
               eos_token_ids: tuple[int, ...], repetition: RepetitionConfig, max_model_len: int) -> "BeamGroup":
        def member() -> Sequence:
            return Sequence(prompt_ids=prompt_ids, params=params, adapter=adapter, emit=lambda _: None,
                            detokenize=detokenize, eos_token_ids=eos_token_ids, repetition=repetition)

        members = [member() for _ in range(beam.num_beams)]
        n_virtual = 0 if adapter is None else adapter.num_virtual_tokens
        limit = max(1, min(params.max_tokens, max_model_len - n_virtual - len(prompt_ids)))
        search = BeamSearch(beam, max_new_tokens=limit, n_eos=0 if params.ignore_eos else len(eos_token_ids))
        group = cls(members=members, search=search, emit=emit, detokenize=detokenize)
        for m in members:
            m.beam = group
        return group

    @property
    def head(self) -> Sequence:
        return self.members[0]

    @property
    def started(self) -> bool:
        return self.running is not None

    @property
    def shared(self) -> int:
        """Positions of the shared prompt (virtual tokens included)."""
        return self.head.n_prefix + len(self.head.prompt_ids)

    # ------------------------------------------------------------------ one step
    def advance(self, logits: torch.Tensor, cache: SlotKVCache) -> None:
        """Feed the logits of this step's rows (the head's last prompt position at first,
        then one row per running beam, in ``running`` order): select the next beams, fork
        their KV, or finish."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        params = self.head.params
        beams = self.running or [self.head]
        if params.repetition_penalty != 1.0:  # transformers applies its processors to the log-probs
            log_probs = torch.stack([apply_repetition_penalty(row, b.prompt_ids + b.output_ids,
                                                              params.repetition_penalty)
                                     for row, b in zip(log_probs, beams)])
        history = [list(b.output_ids) for b in beams]
        continuations = self.search.step(log_probs, lambda parent, token: self._ends(history[parent], token))
        if self.search.done:
            self._finish(self.search.results())
        else:
            self._fork(continuations, beams, cache)

    def _ends(self, tokens: list[int], token: int) -> bool:
        p = self.head.params
        return beam_ends(tokens, token, eos_ids=() if p.ignore_eos else self.head.eos_token_ids,
                         max_new_tokens=self.search.max_new_tokens, stop=p.stop, decode=self.detokenize)

    def _fork(self, continuations: list[Continuation], beams: list[Sequence], cache: SlotKVCache) -> None:
        if not self.started:  # the first step: every beam extends the prompt (own tokens: none yet)
            for m in self.members[1:]:
                m.kv_start = m.cached = self.shared
            for m, c in zip(self.members, continuations):
                m.output_ids = [c.token]
            self.running = list(self.members)
            return
        new_ids = [beams[c.parent].output_ids + [c.token] for c in continuations]
        kept: dict[int, int] = {}  # parent -> the child that keeps its slot
        for i, c in enumerate(continuations):
            kept.setdefault(c.parent, i)
        spare = [b for j, b in enumerate(beams) if j not in kept]
        running: list[Sequence] = []
        for i, c in enumerate(continuations):
            parent = beams[c.parent]
            if kept[c.parent] == i:
                running.append(parent)
                continue
            child = spare.pop()
            cache.move(parent.slot, child.slot, parent.cached, start=self.shared)
            child.cached = parent.cached
            running.append(child)
        for seq, ids in zip(running, new_ids):
            seq.output_ids = ids
        self.running = running

    # ------------------------------------------------------------------ the end
    def _result(self, hyp: Hypothesis) -> CompletionDelta:
        p, ids = self.head.params, list(hyp.tokens)
        reason = "length"
        if ids and ids[-1] in self.head.eos_token_ids and not p.ignore_eos:
            ids, reason = ids[:-1], "stop"
        text, stopped = cut_at_stop(self.detokenize(ids), p.stop)
        if stopped:
            reason = "stop"
        return CompletionDelta(text=text, token_ids=ids, finish_reason=reason,
                               prompt_tokens=len(self.head.prompt_ids), completion_tokens=len(ids))

    def _finish(self, hypotheses: list[Hypothesis]) -> None:
        results = [self._result(h) for h in hypotheses]
        self._close()
        self.emit(results)

    def fail(self, message: str, *, code: str) -> None:
        if self.finished:
            return
        self._close()
        self.emit([CompletionDelta(text="", token_ids=[], finish_reason="error",
                                   prompt_tokens=len(self.head.prompt_ids), completion_tokens=0,
                                   error=message, error_code=code)])

    def _close(self) -> None:
        self.finished = True
        for m in self.members:
            m.status = SeqStatus.FINISHED

"""One engine step's model input: groups of sequences (the running batch's decode tokens,
chunks of prompts being prefilled) laid side by side in a single ``[1, N]`` forward.

``plan_step`` decides what a step carries: one decode token of every sequence whose
prompt is in the cache, plus prompt tokens up to a per-step budget, in slot order -- a
long prompt is prefilled over several steps (chunked prefill) so the streams already
running keep their pace. Each group is a rectangle: its sequences sit in consecutive KV
slots and bring new tokens right-padded to the group's longest (equal lengths in
practice); ``StepBatch`` runs attention per group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from promptfleet.platform.beam_attention import BeamBatch
from promptfleet.platform.kv_cache import StepBatch, SlotBatch, SlotKVCache
from promptfleet.platform.sequence import Sequence
from promptfleet.platform.staging import StepStaging

if TYPE_CHECKING:
    from promptfleet.platform.beam_group import BeamGroup


@dataclass
class Group:
    seqs: list[Sequence]
    new_tokens: list[list[int]]
    is_prompt: bool      # prompt tokens (a prefill chunk) rather than decode tokens
    sample: bool = True  # a token is drawn from each row's last position (not for a prompt's inner chunk)
    beam: "BeamGroup | None" = None  # the decode rows of one beam-search request (seqs: its running beams)

    @property
    def tokens(self) -> int:
        return sum(len(t) for t in self.new_tokens)


def prompt_done(seq: Sequence) -> bool:
    return seq.cached >= seq.n_prefix + len(seq.prompt_ids)


MIN_PROMPT_TOKENS = 16  # prompt tokens a step takes however many rows decode


def _searching(seq: Sequence) -> bool:
    """A beam of a beam search past its prompt, or waiting for its head's prompt."""
    return seq.beam is not None and (seq.beam.started or seq is not seq.beam.head)


def plan_step(running: list[Sequence], *, max_step_tokens: int,
              min_prompt_tokens: int = MIN_PROMPT_TOKENS) -> list[Group]:
    """Groups for one step over ``running`` (in slot order): every decoding sequence (a
    beam search's running beams as one group of their own), and prompt chunks within
    ``max_step_tokens`` minus the decode rows (at least ``min_prompt_tokens``, so prompts
    always progress). A beam search's head prefills its prompt like any request."""
    decoding = sum(1 for s in running if (s.beam.started if _searching(s) else prompt_done(s)))
    budget = max(max_step_tokens - decoding, min_prompt_tokens)
    groups: list[Group] = []
    searches: set[int] = set()
    for seq in running:
        if _searching(seq):
            search = seq.beam
            if search.started and id(search) not in searches:
                searches.add(id(search))
                groups.append(Group(list(search.running), [[b.output_ids[-1]] for b in search.running],
                                    is_prompt=False, beam=search))
            continue
        prev = (groups[-1] if groups and groups[-1].beam is None and groups[-1].seqs[-1].slot == seq.slot - 1
                else None)
        if prompt_done(seq):
            if prev is not None and not prev.is_prompt:
                prev.seqs.append(seq)
                prev.new_tokens.append([seq.output_ids[-1]])
            else:
                groups.append(Group([seq], [[seq.output_ids[-1]]], is_prompt=False))
            continue
        if budget <= 0:
            continue  # waits for the next step, its slot and prefix already held
        done = seq.cached - seq.n_prefix
        take = min(len(seq.prompt_ids) - done, budget)
        budget -= take
        chunk = seq.prompt_ids[done:done + take]
        final = done + take == len(seq.prompt_ids)
        if (prev is not None and prev.is_prompt and prev.sample and final
                and len(prev.new_tokens[0]) == take):  # a burst of equal prompts: one rectangle
            prev.seqs.append(seq)
            prev.new_tokens.append(chunk)
        else:
            groups.append(Group([seq], [chunk], is_prompt=True, sample=final))
    return groups


@dataclass
class StepInput:
    ids: torch.Tensor        # [1, N]
    positions: torch.Tensor  # [1, N]
    ctx: StepBatch
    last: torch.Tensor       # [sampled rows]: index in N of each sampling row's last new token


def build_step_input(groups: list[Group], cache: SlotKVCache, *, n_positions: int, device: torch.device,
                     stage: StepStaging | None = None) -> StepInput:
    """The step's tensors, built on the host and moved to ``device`` in one copy through
    ``stage`` (the engine's, which may carry the sampler's tensors too and is flushed here)."""
    stage = stage or StepStaging(device)
    ids, positions, contexts, last = [], [], [], []
    offset = 0
    for g in groups:
        slot0 = g.seqs[0].slot
        if g.beam is None and any(s.slot != slot0 + i for i, s in enumerate(g.seqs)):
            raise AssertionError("a group must occupy consecutive KV slots")
        q_lens = [len(t) for t in g.new_tokens]
        width = max(q_lens)
        block = torch.zeros(len(g.seqs), width, dtype=torch.long)
        for b, toks in enumerate(g.new_tokens):
            block[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        start = [s.cached for s in g.seqs]
        pos = (torch.tensor(start)[:, None] + torch.arange(width)[None]).clamp_(max=n_positions - 1)
        ids.append(block.reshape(-1))
        positions.append(pos.reshape(-1))
        if g.beam is not None:
            if width != 1 or min(start) != max(start):
                raise AssertionError("a beam search's beams advance together, one token each")
            contexts.append(BeamBatch(cache, head=g.beam.head.slot, slots=[s.slot for s in g.seqs],
                                      shared=g.beam.shared, start=start[0]))
        else:
            contexts.append(SlotBatch(cache, slot0, start, q_lens, width, stage))
        if g.sample:
            last.extend(offset + b * width + q - 1 for b, q in enumerate(q_lens))
        offset += len(g.seqs) * width
    staged = [stage.add(torch.cat(ids)[None]), stage.add(torch.cat(positions)[None]),
              stage.add(torch.tensor(last, dtype=torch.long))]
    stage.flush()
    ids_d, positions_d, last_d = (t.get() for t in staged)
    return StepInput(ids=ids_d, positions=positions_d, ctx=StepBatch(contexts), last=last_d)

"""One engine step's model input: groups of sequences (the running batch's decode tokens,
the prompts admitted this step) packed into a single ``[1, N]`` forward.

Each group is a rectangle: its sequences sit in consecutive KV slots and bring new
tokens right-padded to the group's longest; ``PackedBatch`` runs attention per group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from promptfleet.platform.kv_cache import PackedBatch, SlotBatch, SlotKVCache
from promptfleet.platform.sequence import Sequence


@dataclass
class Group:
    seqs: list[Sequence]
    new_tokens: list[list[int]]
    is_prompt: bool  # a prefill (counted as prompt tokens) rather than decode tokens

    @classmethod
    def decode(cls, seqs: list[Sequence]) -> "Group":
        return cls(seqs, [[s.output_ids[-1]] for s in seqs], is_prompt=False)

    @classmethod
    def prefill(cls, seqs: list[Sequence]) -> "Group":
        return cls(seqs, [s.prompt_ids for s in seqs], is_prompt=True)


@dataclass
class PackedInput:
    ids: torch.Tensor        # [1, N]
    positions: torch.Tensor  # [1, N]
    ctx: PackedBatch
    last: torch.Tensor       # [rows]: index in N of each sequence's last new token


def pack(groups: list[Group], cache: SlotKVCache, *, n_positions: int, device: torch.device) -> PackedInput:
    ids, positions, contexts, last = [], [], [], []
    offset = 0
    for g in groups:
        slot0 = g.seqs[0].slot
        if any(s.slot != slot0 + i for i, s in enumerate(g.seqs)):
            raise AssertionError("a packed group must occupy consecutive KV slots")
        q_lens = [len(t) for t in g.new_tokens]
        width = max(q_lens)
        block = torch.zeros(len(g.seqs), width, dtype=torch.long)
        for b, toks in enumerate(g.new_tokens):
            block[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        start = [s.cached for s in g.seqs]
        pos = (torch.tensor(start)[:, None] + torch.arange(width)[None]).clamp_(max=n_positions - 1)
        ids.append(block.reshape(-1))
        positions.append(pos.reshape(-1))
        contexts.append(SlotBatch(cache, slot0, start, q_lens, width))
        last.extend(offset + b * width + q - 1 for b, q in enumerate(q_lens))
        offset += len(g.seqs) * width
    return PackedInput(ids=torch.cat(ids)[None].to(device), positions=torch.cat(positions)[None].to(device),
                       ctx=PackedBatch(contexts), last=torch.tensor(last, device=device))

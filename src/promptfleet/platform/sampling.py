"""Per-request sampling parameters and a batched sampler.

Greedy rows take one vectorised argmax; sampled rows apply repetition penalty,
temperature, top-k and top-p, then draw with the request's own ``torch.Generator``
when it has a seed, so a seeded request gives the same text whatever its batch mates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                   # 0 = off
    repetition_penalty: float = 1.0  # 1 = off (HF semantics: divide positive logits, multiply negative)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    detect_repetition: bool | None = None  # None = the engine's default

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass
class SamplerRow:
    """What the sampler needs from one running sequence."""

    params: SamplingParams
    history: list[int]                       # prompt + generated ids (repetition penalty)
    generator: torch.Generator | None = field(default=None)


def apply_repetition_penalty(logits: torch.Tensor, history: list[int], penalty: float) -> torch.Tensor:
    if penalty == 1.0 or not history:
        return logits
    idx = torch.tensor(sorted(set(history)), dtype=torch.long, device=logits.device)
    picked = logits.index_select(0, idx)
    logits = logits.clone()
    logits[idx] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) every token outside the top-k and the top-p nucleus of a 1-D row."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        cum = probs.cumsum(-1)
        drop = cum - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits: torch.Tensor, rows: list[SamplerRow], default_generator: torch.Generator) -> list[int]:
    """One token for each row of ``logits`` ``[B, V]`` (float32)."""
    out = logits.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        p = row.params
        if p.greedy and p.repetition_penalty == 1.0:
            continue
        x = apply_repetition_penalty(logits[i], row.history, p.repetition_penalty)
        if p.greedy:
            out[i] = int(x.argmax())
            continue
        x = filter_top_k_top_p(x / p.temperature, p.top_k, p.top_p)
        probs = x.softmax(-1)
        gen = row.generator if row.generator is not None else default_generator
        out[i] = int(torch.multinomial(probs, 1, generator=gen))
    return out

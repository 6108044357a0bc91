"""Beam search for one request, one step at a time, as transformers defines it.

``BeamSearch`` is ``GenerationMixin._beam_search`` (transformers 5) for a batch of one,
written against the engine's rows instead of a padded ``[batch, beams, max_length]``
tensor: the same float32 scores, the same ``torch.topk`` selections in the same order, so
the beams equal ``generate(num_beams=k, do_sample=False)`` token for token:

- each step keeps the top ``max(2, 1 + number of EOS ids) * k`` continuations of all
  running beams by accumulated log-probability (the first step expands the prompt alone,
  which is what transformers' initial ``[0, -1e9, ...]`` beam scores amount to);
- a continuation that ends (EOS, a stop string, or the length limit) becomes a finished
  hypothesis if it is among the top ``k``, scored ``sum_logprobs / length ** length_penalty``
  (length = generated tokens, EOS included), and the best ``k`` finished ones are kept;
- the best ``k`` that did not end are the next step's beams;
- the search stops when every continuation ends, when ``early_stopping=True`` and ``k``
  hypotheses are finished, or when transformers' heuristic says no running beam can
  beat the worst kept hypothesis (``early_stopping=False``: at the current length;
  ``"never"``: at the longest length when ``length_penalty > 0``).

The engine owns the model and the KV cache; this class only sees log-probabilities and
answers which (parent beam, token) pairs continue (``platform.beam_group``).
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

EarlyStopping = bool | str  # True, False or "never" (transformers' values)
MAX_LENGTH_PENALTY = 10.0


@dataclass(frozen=True)
class BeamParams:
    """Beam width, how many of the best finished beams to return, and the scoring."""

    num_beams: int
    num_return: int = 1
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False

    def __post_init__(self) -> None:
        if isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int) or self.num_beams < 2:
            raise ValueError(f"beam search needs at least 2 beams, got {self.num_beams!r}")
        if isinstance(self.num_return, bool) or not isinstance(self.num_return, int) \
                or not 1 <= self.num_return <= self.num_beams:
            raise ValueError(f"the beams returned must be between 1 and the beam width {self.num_beams}, "
                             f"got {self.num_return!r}")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not -MAX_LENGTH_PENALTY <= lp <= MAX_LENGTH_PENALTY:
            raise ValueError(f"length_penalty must be a number in [-{MAX_LENGTH_PENALTY:g}, {MAX_LENGTH_PENALTY:g}], "
                             f"got {lp!r}")
        if not (self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be true, false or \"never\", got {self.early_stopping!r}")


@dataclass(frozen=True)
class Hypothesis:
    """A finished beam: its generated ids (the ending EOS included) and its score."""

    tokens: list[int]
    score: float


@dataclass(frozen=True)
class Continuation:
    parent: int  # the running beam it extends (an index into the previous step's beams)
    token: int


_NEG = -1.0e9  # transformers' "impossible" score offset


def beam_ends(tokens: list[int], token: int, *, eos_ids: Collection[int], max_new_tokens: int,
              stop: Sequence[str], decode: Callable[[list[int]], str]) -> bool:
    """Whether a beam of ``tokens`` continued by ``token`` ends there: an EOS id (pass none
    to ignore EOS), the length limit, or its text (``decode``) reaching a stop string."""
    if token in eos_ids or len(tokens) + 1 >= max_new_tokens:
        return True
    return bool(stop) and any(s in decode(tokens + [token]) for s in stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to its first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class BeamSearch:
    def __init__(self, params: BeamParams, *, max_new_tokens: int, n_eos: int) -> None:
        self.params = params
        self.max_new_tokens = max_new_tokens
        k = params.num_beams
        self.keep = max(2, 1 + n_eos) * k  # continuations kept per step
        self._top_k_mask = torch.arange(self.keep) < k
        self.running: list[list[int]] = [[]]  # generated ids of each running beam (the prompt alone at first)
        self.running_scores = torch.zeros(1)
        self.finished: list[list[int]] = [[] for _ in range(k)]
        self.finished_scores = torch.full((k,), _NEG)
        self.is_finished = torch.zeros(k, dtype=torch.bool)
        self._improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.generated = 0      # tokens generated per beam so far
        self.done = False

    def step(self, log_probs: torch.Tensor, ends: Callable[[int, int], bool]) -> list[Continuation]:
        """One step over ``log_probs`` (``[len(running), vocab]``, float32, processed);
        ``ends(parent, token)`` says whether that continuation ends (EOS, stop, length).
        Returns the next running beams (``[]`` when the search is done)."""
        if self.done:
            raise RuntimeError("the beam search has finished")
        if log_probs.shape[0] != len(self.running):
            raise ValueError(f"{log_probs.shape[0]} rows of log-probabilities for {len(self.running)} beams")
        k, vocab = self.params.num_beams, log_probs.shape[1]
        accumulated = (log_probs + self.running_scores[:, None]).reshape(-1)
        top_scores, top_indices = torch.topk(accumulated, k=self.keep)
        parents = (top_indices // vocab).tolist()
        tokens = (top_indices % vocab).tolist()
        candidates = [self.running[p] + [t] for p, t in zip(parents, tokens)]
        hits = torch.tensor([ends(p, t) for p, t in zip(parents, tokens)], dtype=torch.bool)

        # the best k that go on
        running_scores = top_scores + hits.to(torch.float32) * _NEG
        chosen = torch.topk(running_scores, k=k)[1].tolist()
        self.running = [candidates[i] for i in chosen]
        self.running_scores = running_scores[chosen]
        next_beams = [Continuation(parents[i], tokens[i]) for i in chosen]

        # the finished hypotheses: the top k of those just ended, merged with the kept ones
        just_finished = hits & self._top_k_mask
        scores = top_scores / ((self.generated + 1) ** self.params.length_penalty)
        full = bool(self.is_finished.all()) and self.params.early_stopping is True
        scores = scores + torch.tensor(float(full)) * _NEG
        scores = scores + torch.tensor(float(not self._improvable)) * _NEG
        scores = scores + (~just_finished) * _NEG
        merged_scores = torch.cat((self.finished_scores, scores))
        merged = self.finished + candidates
        merged_finished = torch.cat((self.is_finished, just_finished))
        best = torch.topk(merged_scores, k=k)[1].tolist()
        self.finished = [merged[i] for i in best]
        self.finished_scores = merged_scores[best]
        self.is_finished = merged_finished[best]

        self.generated += 1
        self._improvable = self._improvable and self._can_improve()
        all_full = bool(self.is_finished.all()) and self.params.early_stopping is True
        self.done = not (self._improvable and not all_full and not bool(hits.all()))
        return [] if self.done else next_beams

    def _can_improve(self) -> bool:
        """transformers' ``_check_early_stop_heuristic``: could the best running beam still
        beat the worst kept hypothesis?"""
        p = self.params
        length = (self.max_new_tokens if p.early_stopping == "never" and p.length_penalty > 0.0
                  else self.generated)
        best_running = self.running_scores[:1] / (length ** p.length_penalty)
        worst = torch.where(self.is_finished, torch.min(self.finished_scores), torch.tensor(_NEG))
        return bool(torch.any(best_running > worst))

    def results(self) -> list[Hypothesis]:
        """The finished hypotheses, best first (``num_return`` of them)."""
        if not self.done:
            raise RuntimeError("the beam search has not finished")
        out = [Hypothesis(list(t), float(s)) for t, s, f in zip(self.finished, self.finished_scores.tolist(),
                                                                 self.is_finished.tolist()) if f]
        return out[: self.params.num_return]

"""Decoding settings tuned on a job's validation data, after training: the trained adapter
completes the validation prompts under each of a few settings (greedy, greedy with a
repetition penalty, beam search with 2 and 4 beams, two sampled ones with fixed seeds),
each is scored by exact match, and the best becomes the new adapter version's generation
defaults (what a request that sets no sampling field is served with). Ties go to the
earlier, cheaper setting, greedy first. A beam setting is scored with the engine's own beam
search (``beam_decode``) and stored as ``num_beams`` plus ``temperature`` 0, so a request
that streams (beams cannot) is served greedily.

The defaults also bound ``max_tokens`` by the validation references (twice the longest
plus a margin: a one-word label needs a few tokens, not the server's 16) and, where no
reference spans lines, stop at a newline (the cut exact match already makes).

Cost: ``budget`` completions at most (validation examples x settings; a k-beam
completion runs k rows); the table of what was tried goes to the job's metrics.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from promptfleet.platform.beam_search import BeamParams, cut_at_stop
from promptfleet.trainer.beam_decode import beam_batch
from promptfleet.trainer.datasets import Example
from promptfleet.trainer.evaluate import EVAL_BATCH_SIZE, EXTRA_TOKENS, Pick, complete_examples, exact_match

log = logging.getLogger(__name__)

DEFAULT_BUDGET = 256  # completions: validation examples x settings


@dataclass(frozen=True)
class Candidate:
    name: str
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1

    def defaults(self) -> dict[str, float]:
        """The generation-default fields this setting differs from the server's in."""
        out: dict[str, float] = {"temperature": self.temperature}
        if self.num_beams > 1:
            out["num_beams"] = self.num_beams
        if self.top_p < 1.0:
            out["top_p"] = self.top_p
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        return out


# what a client that sends no sampling field got before adapters carried defaults
CLIENT_DEFAULT = Candidate("temperature 1.0 (a client's default)", temperature=1.0)
CANDIDATES = (
    Candidate("greedy"),
    Candidate("greedy, repetition_penalty 1.2", repetition_penalty=1.2),
    Candidate("beam search, 2 beams", num_beams=2),
    Candidate("beam search, 4 beams", num_beams=4),
    Candidate("temperature 0.7, top_p 0.9", temperature=0.7, top_p=0.9),
    CLIENT_DEFAULT,
)


def sampler(candidate: Candidate, prompts: Sequence[Sequence[int]], *, seed: int) -> Pick:
    """``candidate`` as a token picker: repetition penalty over each row's prompt and output
    (transformers' rule: divide a positive logit, multiply a negative one), then greedy or
    temperature + top-p sampling from a generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)

    def pick(logits: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
        logits = logits.float().clone()
        if candidate.repetition_penalty != 1.0:
            for r, (prompt, out) in enumerate(zip(prompts, generated)):
                seen = torch.tensor(sorted(set(prompt) | set(out)), dtype=torch.long, device=logits.device)
                if seen.numel():
                    vals = logits[r, seen]
                    logits[r, seen] = torch.where(vals > 0, vals / candidate.repetition_penalty,
                                                  vals * candidate.repetition_penalty)
        if candidate.temperature < 1e-5:
            return logits.argmax(-1)
        probs = torch.softmax(logits / candidate.temperature, dim=-1)
        if candidate.top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p >= candidate.top_p  # keep the smallest set reaching top_p
            sorted_p = sorted_p.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)

    return pick


def beam_texts(model: Any, examples: Sequence[Example], num_beams: int, *, tokenizer: Any, eos_id: int, pad_id: int,
               stop: Sequence[str]) -> list[str]:
    """The best beam's text for each example (EOS cut, special tokens skipped, cut at a stop
    string), decoded as long as the batch's longest reference plus ``EXTRA_TOKENS``."""
    texts: list[str] = []
    size = max(1, EVAL_BATCH_SIZE // num_beams)
    for start in range(0, len(examples), size):
        chunk = examples[start:start + size]
        budget = max(len(e.completion_ids) for e in chunk) + EXTRA_TOKENS
        for toks in beam_batch(model, [e.prompt_ids for e in chunk], beam=BeamParams(num_beams), max_new_tokens=budget,
                               eos_id=eos_id, pad_id=pad_id, tokenizer=tokenizer, stop=stop):
            text = tokenizer.decode(toks[:-1] if toks and toks[-1] == eos_id else toks, skip_special_tokens=True)
            texts.append(cut_at_stop(text, stop)[0])
    return texts


def _accuracy(model: Any, examples: Sequence[Example], candidate: Candidate, *, tokenizer: Any, eos_id: int,
              pad_id: int, seed: int, stop: Sequence[str]) -> float:
    if candidate.num_beams > 1:
        texts = beam_texts(model, examples, candidate.num_beams, tokenizer=tokenizer, eos_id=eos_id, pad_id=pad_id,
                           stop=stop)
    else:
        texts = complete_examples(model, examples, tokenizer=tokenizer, eos_id=eos_id, pad_id=pad_id,
                                  picker=lambda prompts, start: sampler(candidate, prompts, seed=seed + start))
    return sum(exact_match(t, e.completion) for t, e in zip(texts, examples)) / len(examples)


def search_decoding(model: Any, validation: Sequence[Example], *, tokenizer: Any, eos_id: int, pad_id: int,
                    budget: int = DEFAULT_BUDGET, seed: int = 0,
                    candidates: Sequence[Candidate] = CANDIDATES) -> dict[str, Any]:
    """Score ``candidates`` on (up to ``budget // len(candidates)`` of) ``validation``:
    ``{"tried": [{name, settings, accuracy}], "best": <generation defaults>, "examples", "seconds"}``."""
    if not validation:
        raise ValueError("the decoding search needs validation examples")
    n = max(1, min(len(validation), budget // len(candidates)))
    subset = list(validation)[:n]
    # the stop the defaults will carry (beams end there when served, so they do here)
    stop = [] if any("\n" in e.completion.strip() for e in validation) else ["\n"]
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        tried = [{"name": c.name, "settings": {k: v for k, v in asdict(c).items() if k != "name"},
                  "accuracy": round(_accuracy(model, subset, c, tokenizer=tokenizer, eos_id=eos_id, pad_id=pad_id,
                                              seed=seed, stop=stop), 6)}
                 for c in candidates]
    finally:
        model.train(was_training)
    best_i = max(range(len(tried)), key=lambda i: (tried[i]["accuracy"], -i))  # ties: the earlier setting
    longest = max(len(e.completion_ids) for e in validation)
    best = {**candidates[best_i].defaults(), "max_tokens": 2 * longest + EXTRA_TOKENS}
    if stop:
        best["stop"] = stop
    log.info("decoding search on %d validation examples: %s -> %s", n,
             ", ".join(f"{r['name']} {r['accuracy']:.3f}" for r in tried), best)
    return {"tried": tried, "best": best, "chosen": candidates[best_i].name, "examples": n,
            "seconds": round(time.perf_counter() - t0, 3)}

"""Beam search on the trainer's model, for the decoding search (``decoding_search``).

The engine's own algorithm (``platform.beam_search.BeamSearch``: transformers' beam search,
step for step) drives the trained model here, so a beam setting is scored on validation
data with the beams the server will serve. Each step runs the model's full forward over
every running beam's whole sequence (``evaluate.prefill``, no cache: the layout PEFT's own
forward uses, right for prompt tuning, P-tuning and prefix tuning alike), all examples of
a batch in one forward. A beam also ends where its text reaches a stop string.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from promptfleet.platform.beam_search import BeamParams, BeamSearch
from promptfleet.trainer.evaluate import prefill


@torch.no_grad()
def beam_batch(model: Any, prompts: Sequence[Sequence[int]], *, beam: BeamParams, max_new_tokens: int, eos_id: int,
               pad_id: int, tokenizer: Any = None, stop: Sequence[str] = ()) -> list[list[int]]:
    """The best beam of each prompt (its generated ids, the ending EOS included if any)."""
    if stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer")
    searches = [BeamSearch(beam, max_new_tokens=max_new_tokens, n_eos=1) for _ in prompts]

    def ends(tokens: list[int], token: int) -> bool:
        if token == eos_id or len(tokens) + 1 >= max_new_tokens:
            return True
        return bool(stop) and any(s in tokenizer.decode(tokens + [token], skip_special_tokens=True) for s in stop)

    while active := [i for i, s in enumerate(searches) if not s.done]:
        rows = [list(prompts[i]) + beam_ids for i in active for beam_ids in searches[i].running]
        out, _ = prefill(model, rows, pad_id=pad_id, use_cache=False)
        log_probs = torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()
        offset = 0
        for i in active:
            search = searches[i]
            running, count = search.running, len(search.running)
            search.step(log_probs[offset:offset + count], lambda parent, token, running=running: ends(running[parent],
                                                                                                     token))
            offset += count
    return [s.results()[0].tokens for s in searches]

"""Beam search on the trainer's model, for the decoding search (``decoding_search``).

The engine's own algorithm (``platform.beam_search.BeamSearch``: transformers' beam search,
step for step) drives the trained model here, so a beam setting is scored on validation
data with the beams the server will serve. A batch of examples runs as ``examples x k``
rows: one prefill of every prompt in the layout PEFT's own forward uses
(``evaluate.CachedDecoder``: virtual tokens or the prefix K/V, then the left-padded prompt, right
for prompt tuning, P-tuning and prefix tuning alike), then one token per row per step on
the KV cache, reordered to each step's parent beams (rows stay within their example). A
beam also ends where its text reaches a stop string.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from promptfleet.platform.beam_search import BeamParams, BeamSearch, beam_ends
from promptfleet.trainer.evaluate import CachedDecoder


@torch.no_grad()
def beam_batch(model: Any, prompts: Sequence[Sequence[int]], *, beam: BeamParams, max_new_tokens: int, eos_id: int,
               pad_id: int, tokenizer: Any = None, stop: Sequence[str] = ()) -> list[list[int]]:
    """The best beam of each prompt (its generated ids, the ending EOS included if any)."""
    if stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer")
    k = beam.num_beams
    searches = [BeamSearch(beam, max_new_tokens=max_new_tokens, n_eos=1) for _ in prompts]

    def ends(tokens: list[int], token: int) -> bool:
        return beam_ends(tokens, token, eos_ids=(eos_id,), max_new_tokens=max_new_tokens, stop=stop,
                         decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True))

    decoder = CachedDecoder(model, [p for p in prompts for _ in range(k)], pad_id=pad_id)
    first = True
    while True:
        log_probs = torch.log_softmax(decoder.logits.float(), dim=-1).cpu()
        tokens = torch.zeros(len(prompts) * k, dtype=torch.long)
        order = torch.arange(len(prompts) * k)  # the row each row's cache comes from (finished: itself)
        for e, search in enumerate(searches):
            if search.done:
                continue
            running = search.running
            rows = log_probs[e * k:e * k + 1] if first else log_probs[e * k:(e + 1) * k]
            step = search.step(rows, lambda parent, token, running=running: ends(running[parent], token))
            for i, c in enumerate(step):
                tokens[e * k + i] = c.token
                order[e * k + i] = e * k + c.parent
        first = False
        if all(s.done for s in searches):
            break
        decoder.cache.reorder_cache(order.to(decoder.device))
        decoder.step(tokens)
    return [s.results()[0].tokens for s in searches]

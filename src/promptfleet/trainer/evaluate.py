"""Validation: loss and exact-match accuracy of greedy completions, with or without an adapter.

Greedy decoding is our own batched loop with a KV cache on the base module, NOT
``PeftModel.generate``: with peft 0.21 its cached path re-feeds the virtual tokens at
every step for prompt learning, and even ``use_cache=False`` grows a prefix-tuning cache
across steps on a Llama. The loop lays a batch out the way PEFT's own forward does
(virtual tokens, then the prompt; for prefix tuning the prefix K/V, then the prompt),
left-pads the prompts behind the virtual tokens with masked padding, gives every real
token the position PEFT gives it (``n_virtual`` + its index in its own prompt), and then
decodes one token per step on the cache. Tests hold it equal to PEFT's full forward,
token for token.

Exact match compares the completion up to EOS with the reference, both with whitespace
collapsed and lower-cased; when the reference holds no newline the completion is also cut
at its first newline (the stop string a client would pass), so a base model that answers
right and then runs on is not scored wrong for the run-on. Decoding is bounded at the
reference's length (EOS included) plus ``extra_tokens``.
"""
from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from promptfleet.trainer.batches import collate
from promptfleet.trainer.datasets import Example

log = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 16
EXTRA_TOKENS = 3


@dataclass(frozen=True)
class Evaluation:
    loss: float            # mean cross-entropy per completion token (EOS included)
    accuracy: float        # exact-match fraction
    examples: int
    completions: list[str]  # the greedy completions, in example order (normalisation not applied)


def normalize(text: str) -> str:
    return " ".join(text.split()).lower()


def exact_match(completion: str, reference: str) -> bool:
    if "\n" not in reference.strip():
        completion = completion.lstrip().split("\n", 1)[0]
    return normalize(completion) == normalize(reference)


def _method(model: Any) -> str | None:
    """``prompt``, ``prefix`` or None (no adapter) for a base module or a ``PeftModel``."""
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return None
    kind = str(getattr(config.peft_type, "value", config.peft_type))
    return "prefix" if kind == "PREFIX_TUNING" else "prompt"


def _base(model: Any) -> Any:
    return model.get_base_model() if _method(model) is not None else model


def _cache_kwarg(base: Any) -> str:
    """transformers 5.2x calls the KV-cache argument ``cache`` (``past_key_values`` is deprecated)."""
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _out_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _n_virtual(model: Any) -> int:
    return int(model.active_peft_config.num_virtual_tokens) if _method(model) is not None else 0


Pick = Callable[[torch.Tensor, list[list[int]]], torch.Tensor]  # (last logits [R, V], tokens so far) -> [R]


def argmax_pick(logits: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
    return logits.argmax(-1)


@torch.no_grad()
def greedy_batch(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int,
                 pad_id: int) -> list[list[int]]:
    """Greedy completions of ``prompts`` (token ids) under ``model`` (a base module or a
    prompt-learning ``PeftModel``); each stops after its EOS or ``max_new_tokens``."""
    return decode_batch(model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)


def prefill(model: Any, prompts: Sequence[Sequence[int]], *, pad_id: int,
            use_cache: bool = True) -> tuple[Any, torch.Tensor]:
    """One forward of ``model`` over ``prompts`` laid out as PEFT lays them out (virtual
    tokens or the prefix K/V first, prompts left-padded behind them, masked): the model's
    output (last position's logits, and its cache with ``use_cache``) and the attention mask."""
    method, base, n = _method(model), _base(model), _n_virtual(model)
    device = next(base.parameters()).device
    rows, width = len(prompts), max(1, max(len(p) for p in prompts))
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        if p:
            ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = 1
    full_mask = torch.cat([torch.ones((rows, n), dtype=torch.long, device=device), mask], dim=1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    kwargs: dict[str, Any] = {"use_cache": use_cache, "logits_to_keep": 1}
    if method == "prompt":
        embeds = base.get_input_embeddings()(ids)
        virtual = model.get_prompt(batch_size=rows).to(embeds.dtype)
        kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
        step_positions = positions
    elif method == "prefix":
        kwargs["input_ids"] = ids
        kwargs[_cache_kwarg(base)] = model.get_prompt(batch_size=rows)
        step_positions = positions[:, n:]
    else:
        kwargs["input_ids"] = ids
        step_positions = positions
    # an empty prompt: the first token is predicted from the last virtual token (or from nothing)
    return base(attention_mask=full_mask, position_ids=step_positions, **kwargs), full_mask


class CachedDecoder:
    """``model`` over ``prompts`` (one ``prefill``), then one new token per row per step on
    its KV cache: ``logits`` holds each row's last logits, ``cache`` may be reordered
    between steps (beam search)."""

    def __init__(self, model: Any, prompts: Sequence[Sequence[int]], *, pad_id: int) -> None:
        self.base = _base(model)
        self.device = next(self.base.parameters()).device
        out, self.mask = prefill(model, prompts, pad_id=pad_id)
        self.cache, self.logits = _out_cache(out), out.logits[:, -1]
        self.next_pos = self.mask.sum(1, keepdim=True)  # n_virtual + own prompt length

    def step(self, tokens: torch.Tensor) -> None:
        """Feed one token per row (``[rows]``)."""
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        out = self.base(input_ids=tokens[:, None].to(self.device), attention_mask=self.mask,
                        position_ids=self.next_pos, use_cache=True, logits_to_keep=1,
                        **{_cache_kwarg(self.base): self.cache})
        self.cache, self.logits = _out_cache(out), out.logits[:, -1]
        self.next_pos = self.next_pos + 1


@torch.no_grad()
def decode_batch(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id: int, pad_id: int,
                 pick: Pick = argmax_pick) -> list[list[int]]:
    """Completions of ``prompts`` under ``model``, each next token chosen by ``pick`` from the
    last logits and what each row generated so far (greedy by default)."""
    decoder = CachedDecoder(model, prompts, pad_id=pad_id)
    rows = len(prompts)
    done = torch.zeros(rows, dtype=torch.bool, device=decoder.device)
    tokens: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        token = pick(decoder.logits, tokens)
        for r in range(rows):
            if not done[r]:
                tokens[r].append(int(token[r]))
        done |= token == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        decoder.step(token)
    return tokens


@torch.no_grad()
def completion_loss(model: Any, examples: Sequence[Example], *, pad_id: int,
                    batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Mean cross-entropy per completion token, teacher-forced, as training computes it."""
    device = next(_base(model).parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id=pad_id).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits[:, -labels.shape[1]:]  # drop the virtual tokens' positions
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((shift_labels != -100).sum())
    return total / max(count, 1)


def complete_examples(model: Any, examples: Sequence[Example], *, tokenizer: Any, eos_id: int, pad_id: int,
                      batch_size: int = EVAL_BATCH_SIZE, extra_tokens: int = EXTRA_TOKENS,
                      picker: Callable[[list[list[int]], int], Pick] | None = None) -> list[str]:
    """The completions of ``examples``' prompts as text, in order, batch by batch; each batch
    decodes as long as its longest reference plus ``extra_tokens`` (EOS cut, special tokens
    skipped). ``picker(prompts, start)`` gives a batch's token picker (default greedy)."""
    texts: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        prompts = [e.prompt_ids for e in chunk]
        budget = max(len(e.completion_ids) for e in chunk) + extra_tokens
        pick = argmax_pick if picker is None else picker(prompts, start)
        for toks in decode_batch(model, prompts, max_new_tokens=budget, eos_id=eos_id, pad_id=pad_id, pick=pick):
            text_ids = toks[:-1] if toks and toks[-1] == eos_id else toks
            texts.append(tokenizer.decode(text_ids, skip_special_tokens=True))
    return texts


def evaluate(model: Any, examples: Sequence[Example], *, tokenizer: Any, eos_id: int, pad_id: int,
             batch_size: int = EVAL_BATCH_SIZE, extra_tokens: int = EXTRA_TOKENS) -> Evaluation:
    """Validation loss and greedy exact-match accuracy of ``model`` on ``examples``."""
    was_training = model.training
    model.eval()
    try:
        loss = completion_loss(model, examples, pad_id=pad_id, batch_size=batch_size)
        # similar lengths together: less padding, and each batch decodes only as long as it needs
        order = sorted(range(len(examples)), key=lambda i: (len(examples[i].completion_ids),
                                                             len(examples[i].prompt_ids)))
        completions: list[str] = [""] * len(examples)
        texts = complete_examples(model, [examples[i] for i in order], tokenizer=tokenizer, eos_id=eos_id,
                                  pad_id=pad_id, batch_size=batch_size, extra_tokens=extra_tokens)
        for i, text in zip(order, texts):
            completions[i] = text
        hits = sum(exact_match(c, e.completion) for c, e in zip(completions, examples))
    finally:
        model.train(was_training)
    accuracy = hits / len(examples) if examples else math.nan
    return Evaluation(loss=loss, accuracy=accuracy, examples=len(examples), completions=completions)

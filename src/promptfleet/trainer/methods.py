"""The three prompt-learning methods a job can train, their defaults, and the PEFT model.

- ``prompt_tuning``: a soft prompt of ``num_virtual_tokens`` embeddings (PEFT PROMPT_TUNING).
- ``p_tuning``: the soft prompt is the output of a small MLP (PEFT's ``PromptEncoder``,
  P_TUNING); PEFT saves that output as ``prompt_embeddings``, so it serves like a soft prompt.
- ``prefix_tuning``: a key/value prefix for every layer (PEFT PREFIX_TUNING).

The defaults were tuned on SmolLM2-135M (``promptfleet bench quality``): what a job
gets when it names only its adapter and dataset.

Text initialisation (``init='text'``) is done here, with the same tokenizer serving uses,
exactly as PEFT does it (the text's token embeddings, repeated or cut to the number of
virtual tokens): PEFT's own TEXT init loads a tokenizer with ``AutoTokenizer`` from a path,
which a GGUF checkpoint does not have.
"""
from __future__ import annotations

import math
from typing import Any, Literal

Method = Literal["prompt_tuning", "p_tuning", "prefix_tuning"]
Init = Literal["text", "random_vocab", "random"]
METHODS: tuple[str, ...] = ("prompt_tuning", "p_tuning", "prefix_tuning")
INITS: tuple[str, ...] = ("text", "random_vocab", "random")

DEFAULT_NUM_VIRTUAL_TOKENS = 16
DEFAULT_EPOCHS = 4
DEFAULT_BATCH_SIZE = 8
DEFAULT_LEARNING_RATES: dict[str, float] = {"prompt_tuning": 0.1, "p_tuning": 3e-3, "prefix_tuning": 1e-2}


def default_learning_rate(method: str) -> float:
    if method not in DEFAULT_LEARNING_RATES:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return DEFAULT_LEARNING_RATES[method]


def peft_config(method: str, *, num_virtual_tokens: int, init: str, encoder_hidden_size: int | None = None) -> Any:
    """The PEFT config for ``method`` (text init is applied after the model is built)."""
    from peft import (PrefixTuningConfig, PromptEncoderConfig, PromptEncoderReparameterizationType,
                      PromptTuningConfig, PromptTuningInit, TaskType)

    if method == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens)
    if method == "p_tuning":
        kwargs = {} if encoder_hidden_size is None else {"encoder_hidden_size": encoder_hidden_size}
        return PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
                                   encoder_reparameterization_type=PromptEncoderReparameterizationType.MLP,
                                   **kwargs)
    if method != "prompt_tuning":
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; use one of {', '.join(INITS)}")
    peft_init = PromptTuningInit.SAMPLE_VOCAB if init == "random_vocab" else PromptTuningInit.RANDOM
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual_tokens,
                              prompt_tuning_init=peft_init)


def text_init_ids(tokenizer: Any, text: str, num_virtual_tokens: int) -> list[int]:
    """PEFT's rule: the text's tokens, cut to ``num_virtual_tokens`` or repeated to fill them."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ValueError("init_text has no tokens")
    if len(ids) < num_virtual_tokens:
        ids = ids * math.ceil(num_virtual_tokens / len(ids))
    return ids[:num_virtual_tokens]


def apply_text_init(model: Any, token_ids: list[int]) -> None:
    """Set a PROMPT_TUNING model's soft prompt to the embeddings of ``token_ids``."""
    import torch

    encoder = model.prompt_encoder[model.active_adapter]
    embeddings = model.get_base_model().get_input_embeddings()
    with torch.no_grad():
        ids = torch.tensor(token_ids, dtype=torch.long, device=embeddings.weight.device)
        encoder.embedding.weight.copy_(embeddings(ids).float())


def wrap(base: Any, method: str, *, num_virtual_tokens: int, init: str, init_text: str | None, tokenizer: Any,
         seed: int, encoder_hidden_size: int | None = None) -> Any:
    """``base`` wrapped with a fresh adapter of ``method``, seeded."""
    import torch
    from peft import get_peft_model

    if method == "prompt_tuning" and init == "text" and not init_text:
        raise ValueError("init='text' needs a non-empty init_text")
    config = peft_config(method, num_virtual_tokens=num_virtual_tokens, init=init,
                         encoder_hidden_size=encoder_hidden_size)
    torch.manual_seed(seed)  # random / sampled-vocabulary / encoder initialisation
    model = get_peft_model(base, config)
    if method == "prompt_tuning" and init == "text":
        apply_text_init(model, text_init_ids(tokenizer, str(init_text), num_virtual_tokens))
    return model

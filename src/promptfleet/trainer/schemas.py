"""The validated job request (``POST /v1/jobs`` body) and the typed training params.

Every field but ``adapter_name`` and ``dataset_id`` has a default tuned on a real small
model (SmolLM2-135M, see ``trainer/methods.py``): prompt tuning, 16 virtual tokens, 4
epochs of batches of 8, the method's learning rate, and a validation split of 10 % when
the dataset has at least 20 examples. The new options live in the job's ``params`` JSON
column, so no schema migration is needed."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from promptfleet.trainer.methods import (DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_NUM_VIRTUAL_TOKENS,
                                         default_learning_rate)

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_VIRTUAL_TOKENS = 512


class JobRequest(BaseModel):
    """A training job. ``init`` defaults to ``text`` when ``init_text`` is given, else
    ``random_vocab``; P-tuning and prefix tuning have no initialisation choice and ignore
    both. ``learning_rate`` defaults to the method's (0.1 prompt tuning, 3e-3 P-tuning, 1e-2
    prefix tuning). ``validation_fraction`` (default: 0.1 from 20 examples up, else 0) holds
    out part of the dataset, or ``validation_dataset_id`` names another of the tenant's
    datasets; with either, each epoch's validation loss and exact-match accuracy (and the
    base model's zero-shot ones) go to the job's metrics. ``early_stopping_patience``: stop
    after that many epochs without a lower validation loss and keep the best epoch's adapter."""

    model_config = ConfigDict(extra="forbid")

    adapter_name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    dataset_id: str = Field(min_length=1, max_length=64)
    method: Literal["prompt_tuning", "p_tuning", "prefix_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(default=DEFAULT_NUM_VIRTUAL_TOKENS, ge=1, le=MAX_VIRTUAL_TOKENS)
    epochs: int = Field(default=DEFAULT_EPOCHS, ge=1, le=1000)
    learning_rate: float | None = Field(default=None, gt=0.0, le=10.0)
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=512)
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    init: Literal["text", "random_vocab", "random"] | None = None
    init_text: str | None = Field(default=None, max_length=4096)
    validation_fraction: float | None = Field(default=None, ge=0.0, le=0.5)
    validation_dataset_id: str | None = Field(default=None, min_length=1, max_length=64)
    early_stopping_patience: int | None = Field(default=None, ge=1, le=1000)
    tune_decoding: bool = Field(default=True, description="With validation data: after training, pick the new "
                                "version's decoding defaults on it (greedy, repetition penalty, sampled).")

    @model_validator(mode="after")
    def _resolve_init(self) -> "JobRequest":
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("init_text must not be blank")
        if self.init is None:
            self.init = "text" if self.init_text else "random_vocab"
        if self.init == "text" and self.method == "prompt_tuning" and not self.init_text:
            raise ValueError("init='text' needs init_text")
        if self.validation_dataset_id is not None and self.validation_fraction:
            raise ValueError("give validation_fraction or validation_dataset_id, not both")
        if self.learning_rate is None:
            self.learning_rate = default_learning_rate(self.method)
        return self

    def params(self) -> dict:
        """What the job row stores in ``params`` (everything the worker needs to train)."""
        return {"num_virtual_tokens": self.num_virtual_tokens, "epochs": self.epochs,
                "learning_rate": self.learning_rate, "batch_size": self.batch_size, "max_steps": self.max_steps,
                "seed": self.seed, "init": self.init, "init_text": self.init_text,
                "validation_fraction": self.validation_fraction, "validation_dataset_id": self.validation_dataset_id,
                "early_stopping_patience": self.early_stopping_patience, "tune_decoding": self.tune_decoding}

"""The validated job request (``POST /v1/jobs`` body) and the typed training params."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MAX_VIRTUAL_TOKENS = 512


class JobRequest(BaseModel):
    """A training job. ``init`` defaults to ``text`` when ``init_text`` is given, else
    ``random_vocab``; prefix tuning has no initialisation choice and ignores both."""

    model_config = ConfigDict(extra="forbid")

    adapter_name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    dataset_id: str = Field(min_length=1, max_length=64)
    method: Literal["prompt_tuning", "prefix_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(default=8, ge=1, le=MAX_VIRTUAL_TOKENS)
    epochs: int = Field(default=3, ge=1, le=1000)
    learning_rate: float = Field(default=3e-2, gt=0.0, le=10.0)
    batch_size: int = Field(default=8, ge=1, le=512)
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    init: Literal["text", "random_vocab", "random"] | None = None
    init_text: str | None = Field(default=None, max_length=4096)

    @model_validator(mode="after")
    def _resolve_init(self) -> "JobRequest":
        if self.init_text is not None and not self.init_text.strip():
            raise ValueError("init_text must not be blank")
        if self.init is None:
            self.init = "text" if self.init_text else "random_vocab"
        if self.init == "text" and self.method == "prompt_tuning" and not self.init_text:
            raise ValueError("init='text' needs init_text")
        return self

    def params(self) -> dict:
        """What the job row stores in ``params`` (everything the worker needs to train)."""
        return {"num_virtual_tokens": self.num_virtual_tokens, "epochs": self.epochs,
                "learning_rate": self.learning_rate, "batch_size": self.batch_size, "max_steps": self.max_steps,
                "seed": self.seed, "init": self.init, "init_text": self.init_text}

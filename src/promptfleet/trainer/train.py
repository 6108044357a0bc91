"""The training loop: PEFT prompt tuning or prefix tuning on the serving backbone.

A plain function with a dataclass config; the Celery task wraps it. The backbone is the
SAME Hugging Face checkpoint directory the server loads, so the adapter it returns (the
two files PEFT's ``save_pretrained`` writes) serves exactly as it trained.

Loss is on completion tokens only: labels are -100 for prompt tokens and padding (PEFT
adds -100 for the virtual tokens). Same seed, same data, same device -> bit-identical
adapter bytes: ``torch.manual_seed`` before the adapter is built and before each step
(dropout), and a seeded ``torch.Generator`` for the data order.
"""
from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import GPT2LMHeadModel

from promptfleet.trainer.datasets import Example

log = logging.getLogger(__name__)

Method = Literal["prompt_tuning", "prefix_tuning"]
Init = Literal["text", "random_vocab", "random"]
_INITS = {"text": PromptTuningInit.TEXT, "random_vocab": PromptTuningInit.SAMPLE_VOCAB,
          "random": PromptTuningInit.RANDOM}
MAX_LOSS_POINTS = 1000


class TrainingCancelled(Exception):
    """``should_cancel()`` answered True; no adapter was produced."""


class WallClockExceeded(Exception):
    """The job ran past its wall-clock limit; no adapter was produced."""


@dataclass(frozen=True)
class WallClock:
    """A job's wall-clock limit: ``limit_s`` seconds after ``started`` (``time.monotonic()``,
    which is system-wide on Linux, so a child process checks the parent's clock)."""

    limit_s: float
    started: float = field(default_factory=time.monotonic)

    def check(self, *, step: int, steps: int) -> None:
        """Raise ``WallClockExceeded`` once the limit has passed (the loop calls this each step)."""
        elapsed = time.monotonic() - self.started
        if elapsed > self.limit_s:
            raise WallClockExceeded(f"job exceeded the wall-clock limit of {self.limit_s:g} s "
                                    f"(PROMPTFLEET_JOB_MAX_WALL_S): stopped after {elapsed:.1f} s, "
                                    f"with {step} of {steps} steps done")


@dataclass(frozen=True)
class TrainConfig:
    model_path: str
    method: Method = "prompt_tuning"
    num_virtual_tokens: int = 8
    epochs: int = 1
    learning_rate: float = 3e-2
    batch_size: int = 8
    max_steps: int | None = None
    seed: int = 0
    init: Init = "random_vocab"
    init_text: str | None = None
    device: str = "cpu"
    weight_decay: float = 0.0


@dataclass
class TrainResult:
    adapter_config: dict[str, Any]
    safetensors_bytes: bytes
    metrics: dict[str, Any]
    model: PeftModel | None = field(default=None, repr=False)


def total_steps(num_examples: int, *, epochs: int, batch_size: int, max_steps: int | None) -> int:
    steps = epochs * math.ceil(num_examples / batch_size)
    return min(steps, max_steps) if max_steps else steps


def peft_config(cfg: TrainConfig) -> PromptTuningConfig | PrefixTuningConfig:
    if cfg.method == "prefix_tuning":
        return PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.method != "prompt_tuning":
        raise ValueError(f"unknown method {cfg.method!r}")
    if cfg.init not in _INITS:
        raise ValueError(f"unknown init {cfg.init!r}; use one of {sorted(_INITS)}")
    if cfg.init == "text":
        if not cfg.init_text:
            raise ValueError("init='text' needs a non-empty init_text")
        return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=cfg.init_text,
                                  tokenizer_name_or_path=str(cfg.model_path))
    return PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens,
                              prompt_tuning_init=_INITS[cfg.init])


def build_model(cfg: TrainConfig) -> PeftModel:
    """The backbone from ``model_path`` (float32, frozen) wrapped with a fresh adapter."""
    base = GPT2LMHeadModel.from_pretrained(cfg.model_path, dtype=torch.float32)
    torch.manual_seed(cfg.seed)  # random / sampled-vocabulary initialisation
    model = get_peft_model(base, peft_config(cfg))
    return model.to(cfg.device)


def collate(examples: Sequence[Example], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (-100 on prompt and padding)."""
    width = max(len(e.prompt_ids) + len(e.completion_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, ex in enumerate(examples):
        seq = list(ex.prompt_ids) + list(ex.completion_ids)
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
        labels[row, len(ex.prompt_ids):len(seq)] = torch.tensor(ex.completion_ids, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batch_order(num_examples: int, *, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices for each step: a fresh seeded permutation per epoch, no data-dependent state."""
    gen = torch.Generator().manual_seed(seed)
    out: list[list[int]] = []
    while len(out) < steps:
        perm = torch.randperm(num_examples, generator=gen).tolist()
        for start in range(0, num_examples, batch_size):
            out.append(perm[start:start + batch_size])
            if len(out) == steps:
                break
    return out


def export_adapter(model: PeftModel) -> tuple[dict[str, Any], bytes]:
    """The two files ``save_pretrained`` writes: ``adapter_config.json`` and the safetensors bytes."""
    with tempfile.TemporaryDirectory(prefix="pf-adapter-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        config = json.loads((Path(tmp) / "adapter_config.json").read_text())
        data = (Path(tmp) / "adapter_model.safetensors").read_bytes()
    return config, data


def _downsample(losses: list[float], limit: int = MAX_LOSS_POINTS) -> list[float]:
    """Per-step losses, or means over equal intervals when there are more than ``limit`` steps."""
    if len(losses) <= limit:
        return [round(x, 6) for x in losses]
    every = math.ceil(len(losses) / limit)
    return [round(sum(chunk) / len(chunk), 6) for chunk in (losses[i:i + every] for i in range(0, len(losses), every))]


def train(cfg: TrainConfig, examples: Sequence[Example], *,
          progress: Callable[[int, int, float], None] | None = None,
          should_cancel: Callable[[], bool] | None = None,
          wall_clock: WallClock | None = None,
          keep_model: bool = False) -> TrainResult:
    """Train an adapter on ``examples``; raises ``TrainingCancelled`` when asked to stop and
    ``WallClockExceeded`` past ``wall_clock``'s limit (both checked before each step).

    ``metrics``: ``loss`` (per step, or interval means past 1000 steps), ``initial_loss``
    (first step), ``final_loss`` (mean of the last ``min(10, ceil(steps/10))`` steps),
    ``examples_per_s`` and ``tokens_per_s`` (real prompt+completion tokens, training steps only).
    """
    if not examples:
        raise ValueError("no training examples")
    steps = total_steps(len(examples), epochs=cfg.epochs, batch_size=cfg.batch_size, max_steps=cfg.max_steps)
    model = build_model(cfg)
    pad_id = model.base_model.config.eos_token_id
    pad_id = 0 if pad_id is None else int(pad_id)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    order = batch_order(len(examples), batch_size=cfg.batch_size, steps=steps, seed=cfg.seed)
    model.train()
    losses: list[float] = []
    n_examples = n_tokens = 0
    train_time = 0.0
    for step, indices in enumerate(order, start=1):
        t0 = time.perf_counter()  # the whole step: our batching, callbacks and all
        if should_cancel is not None and should_cancel():
            raise TrainingCancelled(f"cancelled at step {step - 1} of {steps}")
        if wall_clock is not None:
            wall_clock.check(step=step - 1, steps=steps)
        batch_examples = [examples[i] for i in indices]
        batch = {k: v.to(cfg.device) for k, v in collate(batch_examples, pad_id=pad_id).items()}
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks independent of anything else
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {step}; lower the learning_rate")
        losses.append(value)
        n_examples += len(batch_examples)
        n_tokens += int(batch["attention_mask"].sum())
        if progress is not None:
            progress(step, steps, value)
        train_time += time.perf_counter() - t0
    window = min(10, max(1, math.ceil(steps / 10)))
    metrics = {
        "loss": _downsample(losses),
        "initial_loss": losses[0],
        "final_loss": sum(losses[-window:]) / window,
        "steps": steps,
        "examples": n_examples,
        "tokens": n_tokens,
        "train_seconds": train_time,
        "examples_per_s": n_examples / train_time if train_time > 0 else 0.0,
        "tokens_per_s": n_tokens / train_time if train_time > 0 else 0.0,
    }
    model.eval()
    config, data = export_adapter(model)
    log.info("trained %s adapter: %d steps, loss %.4f -> %.4f, %.1f examples/s", cfg.method, steps,
             metrics["initial_loss"], metrics["final_loss"], metrics["examples_per_s"])
    return TrainResult(adapter_config=config, safetensors_bytes=data, metrics=metrics,
                       model=model if keep_model else None)


def train_dataset(cfg: TrainConfig, data: bytes, *, max_example_tokens: int,
                  on_total: Callable[[int], None] | None = None,
                  progress: Callable[[int, int, float], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None,
                  wall_clock: WallClock | None = None) -> TrainResult:
    """Parse a JSONL dataset with the backbone's tokenizer, announce the number of steps
    (``on_total``), and train: what a job runs, in the worker or in its training process."""
    from promptfleet.platform.tokenizer import load_tokenizer
    from promptfleet.trainer.datasets import parse_dataset

    examples = parse_dataset(data, tokenizer=load_tokenizer(cfg.model_path), max_example_tokens=max_example_tokens,
                             max_examples=10**9)
    if on_total is not None:
        on_total(total_steps(len(examples), epochs=cfg.epochs, batch_size=cfg.batch_size, max_steps=cfg.max_steps))
    return train(cfg, examples, progress=progress, should_cancel=should_cancel, wall_clock=wall_clock)

"""The training loop: PEFT prompt tuning, P-tuning or prefix tuning on the serving backbone.

A plain function with a dataclass config; the Celery task wraps it. The backbone is the
SAME checkpoint the server loads (a Hugging Face directory, a ``.gguf`` file or a bundled
name; see ``backbone.py``), so the adapter it returns (the two files PEFT's
``save_pretrained`` writes) serves exactly as it trained.

Loss is on completion tokens only: labels are -100 for prompt tokens and padding (PEFT
adds -100 for the virtual tokens). Same seed, same data, same device -> bit-identical
adapter bytes: ``torch.manual_seed`` before the adapter is built and before each step
(dropout), and a seeded ``torch.Generator`` for the data order.

With validation examples, the base model's zero-shot validation loss and exact-match
accuracy are measured before training and the adapter's after every epoch
(``evaluate.py``); ``metrics["epochs"]`` holds one entry per epoch, and
``early_stopping_patience`` stops after that many epochs without a lower validation loss,
exporting the best epoch's adapter.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel

from promptfleet.trainer.backbone import eos_id, load_backbone, load_tokenizer
from promptfleet.trainer.decoding_search import DEFAULT_BUDGET, search_decoding
from promptfleet.trainer.batches import (MAX_LOSS_POINTS, _downsample, batch_order, collate,  # noqa: F401
                                         export_adapter, split_validation, total_steps)
from promptfleet.trainer.datasets import Example
from promptfleet.trainer.evaluate import Evaluation, evaluate
from promptfleet.trainer.methods import (DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_NUM_VIRTUAL_TOKENS, Init,
                                         Method, default_learning_rate, wrap)

log = logging.getLogger(__name__)

MAX_EVAL_EXAMPLES = 256


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
    """One training run. ``learning_rate`` None: the method's default (``methods.py``);
    ``init`` None: ``text`` when ``init_text`` is given, else ``random_vocab``;
    ``validation_fraction`` None: 0.1 of a dataset of at least 20 examples, else none (used
    by ``train_dataset``; ``train`` takes its validation examples explicitly)."""

    model_path: str
    method: Method = "prompt_tuning"
    num_virtual_tokens: int = DEFAULT_NUM_VIRTUAL_TOKENS
    epochs: int = DEFAULT_EPOCHS
    learning_rate: float | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_steps: int | None = None
    seed: int = 0
    init: Init | None = None
    init_text: str | None = None
    device: str = "cpu"
    weight_decay: float = 0.0
    validation_fraction: float | None = None
    early_stopping_patience: int | None = None
    max_eval_examples: int = MAX_EVAL_EXAMPLES
    # with validation: tune the served decoding settings on it after training (decoding_search.py)
    tune_decoding: bool = True
    decoding_budget: int = DEFAULT_BUDGET  # completions the search may run (examples x settings)
    encoder_hidden_size: int | None = None  # p_tuning's MLP width (PEFT default: the model width)

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else default_learning_rate(self.method)

    @property
    def resolved_init(self) -> str:
        return self.init or ("text" if self.init_text else "random_vocab")


@dataclass
class TrainResult:
    adapter_config: dict[str, Any]
    safetensors_bytes: bytes
    metrics: dict[str, Any]
    model: PeftModel | None = field(default=None, repr=False)


def build_model(cfg: TrainConfig, *, base: Any = None, tokenizer: Any = None) -> PeftModel:
    """The backbone of ``model_path`` (float32, frozen) wrapped with a fresh adapter."""
    base = base if base is not None else load_backbone(cfg.model_path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model_path)
    model = wrap(base, cfg.method, num_virtual_tokens=cfg.num_virtual_tokens, init=cfg.resolved_init,
                 init_text=cfg.init_text, tokenizer=tokenizer, seed=cfg.seed,
                 encoder_hidden_size=cfg.encoder_hidden_size)
    return model.to(cfg.device)


def _pad_id(config: Any) -> int:
    """Padding for right-padded batches (masked, so any id works): the model's EOS."""
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return 0 if eos is None else int(eos)


def _eval_entry(ev: Evaluation) -> dict[str, float]:
    return {"val_loss": round(ev.loss, 6), "val_accuracy": round(ev.accuracy, 6)}


def train(cfg: TrainConfig, examples: Sequence[Example], *, validation: Sequence[Example] = (),
          progress: Callable[[int, int, float], None] | None = None,
          on_epoch: Callable[[dict[str, Any]], None] | None = None,
          should_cancel: Callable[[], bool] | None = None,
          wall_clock: WallClock | None = None,
          keep_model: bool = False) -> TrainResult:
    """Train an adapter on ``examples``; raises ``TrainingCancelled`` when asked to stop and
    ``WallClockExceeded`` past ``wall_clock``'s limit (both checked before each step).

    ``metrics``: ``loss`` (per step, or interval means past 1000 steps), ``initial_loss``
    (first step), ``final_loss`` (mean of the last ``min(10, ceil(steps/10))`` steps),
    ``examples_per_s`` and ``tokens_per_s`` (real prompt+completion tokens, training steps
    only), ``epochs`` (per epoch: ``train_loss``, and with ``validation``: ``val_loss`` and
    ``val_accuracy``), and with ``validation``: ``zero_shot`` (the base model's), ``best_epoch``
    and ``stopped_early``. ``on_epoch`` gets each epoch's entry (the zero-shot one as epoch 0).
    """
    if not examples:
        raise ValueError("no training examples")
    steps = total_steps(len(examples), epochs=cfg.epochs, batch_size=cfg.batch_size, max_steps=cfg.max_steps)
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    validation = list(validation)[:cfg.max_eval_examples]
    base = load_backbone(cfg.model_path, device=cfg.device)
    pad_id = _pad_id(base.config)
    # the tokenizer only when something needs it (seconds on a first load, inside the wall clock)
    needs_tokenizer = bool(validation) or (cfg.method == "prompt_tuning" and cfg.resolved_init == "text")
    tokenizer = load_tokenizer(cfg.model_path) if needs_tokenizer else None
    eos = eos_id(tokenizer) if tokenizer is not None else pad_id
    metrics: dict[str, Any] = {"epochs": []}
    eval_seconds = 0.0

    def run_eval(model: Any) -> Evaluation:
        nonlocal eval_seconds
        t0 = time.perf_counter()
        ev = evaluate(model, validation, tokenizer=tokenizer, eos_id=eos, pad_id=pad_id)
        eval_seconds += time.perf_counter() - t0
        return ev

    if validation:
        zero = run_eval(base)
        metrics["zero_shot"] = _eval_entry(zero)
        metrics["validation_examples"] = len(validation)
        if on_epoch is not None:
            on_epoch({"epoch": 0, **metrics["zero_shot"]})
        log.info("zero-shot: validation loss %.4f, accuracy %.3f (%d examples)", zero.loss, zero.accuracy,
                 len(validation))
    model = wrap(base, cfg.method, num_virtual_tokens=cfg.num_virtual_tokens, init=cfg.resolved_init,
                 init_text=cfg.init_text, tokenizer=tokenizer, seed=cfg.seed,
                 encoder_hidden_size=cfg.encoder_hidden_size).to(cfg.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = batch_order(len(examples), batch_size=cfg.batch_size, steps=steps, seed=cfg.seed)
    model.train()
    losses: list[float] = []
    n_examples = n_tokens = 0
    train_time = 0.0
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    stale_epochs = 0
    stopped_early = False
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
        if step % per_epoch and step != steps:
            continue
        # the end of an epoch (or of a last, partial one)
        epoch = len(metrics["epochs"]) + 1
        epoch_losses = losses[(epoch - 1) * per_epoch:]
        entry: dict[str, Any] = {"epoch": epoch, "step": step,
                                 "train_loss": round(sum(epoch_losses) / len(epoch_losses), 6)}
        if validation:
            ev = run_eval(model)
            entry.update(_eval_entry(ev))
            if best is None or ev.loss < best[0]:
                best = (ev.loss, epoch, {k: v.detach().clone() for k, v in model.named_parameters()
                                         if v.requires_grad})
                stale_epochs = 0
            else:
                stale_epochs += 1
        metrics["epochs"].append(entry)
        if on_epoch is not None:
            on_epoch(entry)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k} {v}" for k, v in entry.items() if k != "epoch"))
        if cfg.early_stopping_patience and stale_epochs >= cfg.early_stopping_patience and step != steps:
            stopped_early = True
            log.info("early stop after epoch %d: no lower validation loss for %d epochs", epoch, stale_epochs)
            break
    done = len(losses)
    if validation:
        metrics["best_epoch"] = best[1] if best else None
        metrics["stopped_early"] = stopped_early
        if cfg.early_stopping_patience and best is not None:  # export the best epoch's adapter
            with torch.no_grad():
                named = dict(model.named_parameters())
                for k, v in best[2].items():
                    named[k].copy_(v)
        if cfg.tune_decoding and cfg.decoding_budget > 0:
            metrics["decoding"] = search_decoding(model, validation, tokenizer=tokenizer, eos_id=eos, pad_id=pad_id,
                                                  budget=cfg.decoding_budget, seed=cfg.seed)
            eval_seconds += metrics["decoding"]["seconds"]
        metrics["eval_seconds"] = eval_seconds
    window = min(10, max(1, math.ceil(done / 10)))
    metrics.update({
        "loss": _downsample(losses),
        "initial_loss": losses[0],
        "final_loss": sum(losses[-window:]) / window,
        "steps": done,
        "examples": n_examples,
        "tokens": n_tokens,
        "train_seconds": train_time,
        "examples_per_s": n_examples / train_time if train_time > 0 else 0.0,
        "tokens_per_s": n_tokens / train_time if train_time > 0 else 0.0,
        "learning_rate": cfg.lr,
    })
    model.eval()
    config, data = export_adapter(model)
    log.info("trained %s adapter: %d steps, loss %.4f -> %.4f, %.1f examples/s", cfg.method, done,
             metrics["initial_loss"], metrics["final_loss"], metrics["examples_per_s"])
    return TrainResult(adapter_config=config, safetensors_bytes=data, metrics=metrics,
                       model=model if keep_model else None)


def train_dataset(cfg: TrainConfig, data: bytes, *, max_example_tokens: int,
                  validation_data: bytes | None = None,
                  on_total: Callable[[int], None] | None = None,
                  progress: Callable[[int, int, float], None] | None = None,
                  on_epoch: Callable[[dict[str, Any]], None] | None = None,
                  should_cancel: Callable[[], bool] | None = None,
                  wall_clock: WallClock | None = None) -> TrainResult:
    """Parse a JSONL dataset with the backbone's tokenizer, hold out its validation split
    (or parse ``validation_data``, a second dataset), announce the number of steps
    (``on_total``), and train: what a job runs, in the worker or in its training process."""
    from promptfleet.trainer.datasets import parse_dataset

    tokenizer = load_tokenizer(cfg.model_path)
    examples = parse_dataset(data, tokenizer=tokenizer, max_example_tokens=max_example_tokens, max_examples=10**9)
    if validation_data is not None:
        validation = parse_dataset(validation_data, tokenizer=tokenizer, max_example_tokens=max_example_tokens,
                                   max_examples=10**9)
    else:
        examples, validation = split_validation(examples, cfg.validation_fraction, seed=cfg.seed)
    if on_total is not None:
        on_total(total_steps(len(examples), epochs=cfg.epochs, batch_size=cfg.batch_size, max_steps=cfg.max_steps))
    return train(cfg, examples, validation=validation, progress=progress, on_epoch=on_epoch,
                 should_cancel=should_cancel, wall_clock=wall_clock)

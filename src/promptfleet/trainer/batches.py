"""The data side of a training run: steps, the validation split, batches, the seeded data
order, the exported adapter files and the loss curve kept in a job's metrics."""
from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from promptfleet.trainer.datasets import Example

MAX_LOSS_POINTS = 1000
AUTO_VALIDATION_FRACTION = 0.1
AUTO_VALIDATION_MIN_EXAMPLES = 20


def total_steps(num_examples: int, *, epochs: int, batch_size: int, max_steps: int | None) -> int:
    steps = epochs * math.ceil(num_examples / batch_size)
    return min(steps, max_steps) if max_steps else steps


def split_validation(examples: Sequence[Example], fraction: float | None, *,
                     seed: int) -> tuple[list[Example], list[Example]]:
    """``(train, validation)``: a seeded random ``fraction`` held out (None: 0.1 of a dataset
    of at least 20 examples, else nothing). At least one example stays on each side."""
    examples = list(examples)
    if fraction is None:
        fraction = AUTO_VALIDATION_FRACTION if len(examples) >= AUTO_VALIDATION_MIN_EXAMPLES else 0.0
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or len(examples) < 2:
        return examples, []
    k = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 7919)).tolist()
    held = set(perm[:k])
    return ([e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)])


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


def export_adapter(model: Any) -> tuple[dict[str, Any], bytes]:
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

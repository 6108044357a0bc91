"""Does an adapter trained here make a real model better at a real task? Zero-shot vs tuned
held-out exact-match accuracy, per task, on SmolLM2-135M by default::

    promptfleet bench quality [--model smollm2-135m] [--tasks sentiment,capital_json,normalize]
                              [--train-examples 64] [--test-examples 32] [--seed 0] [--json OUT]

Each task's data is generated deterministically (``quality_tasks.py``); its test set is
held out by content. Training goes through ``trainer.train.train_dataset``, the function
every job runs, with the job defaults (only the model, the data and the seed are given);
the test set is the job's validation dataset, so the zero-shot figure is the base model's
and the tuned figure the adapter's after the last epoch (no epoch is picked by its test
score). The job's decoding search runs on the same set: the table also shows the adapter
sampled at temperature 1 (what a client that sends no settings got before tuned defaults)
and with the defaults the job picked. Prints a table; target: every task >= 85 % tuned or
>= +40 points over zero-shot.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

from tqdm import tqdm

from promptfleet.bench.quality_tasks import TASKS, to_jsonl
from promptfleet.trainer.decoding_search import CLIENT_DEFAULT
from promptfleet.trainer.train import TrainConfig, train_dataset

log = logging.getLogger(__name__)

TARGET_ACCURACY = 0.85
TARGET_GAIN = 0.40


def met(zero_shot: float, tuned: float) -> bool:
    return tuned >= TARGET_ACCURACY or tuned - zero_shot >= TARGET_GAIN


def run_task(name: str, *, model: str, seed: int, n_train: int, n_test: int) -> dict[str, Any]:
    task = TASKS[name](seed, n_train, n_test)
    cfg = TrainConfig(model_path=model, seed=seed)
    bar = tqdm(total=None, desc=name, unit="step", leave=False)

    def progress(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.update(step - bar.n)
        bar.set_postfix_str(f"loss={loss:.3f}", refresh=False)

    t0 = time.perf_counter()
    try:
        result = train_dataset(cfg, to_jsonl(task.train), max_example_tokens=1024,
                               validation_data=to_jsonl(task.test), progress=progress)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    m = result.metrics
    zero, tuned = m["zero_shot"]["val_accuracy"], m["epochs"][-1]["val_accuracy"]
    decoding = m.get("decoding") or {}
    by_name = {t["name"]: t["accuracy"] for t in decoding.get("tried", [])}
    return {"client_default_accuracy": by_name.get(CLIENT_DEFAULT.name), "tuned_decoding": decoding.get("chosen"),
            "tuned_decoding_accuracy": by_name.get(decoding.get("chosen")), "generation_defaults": decoding.get("best"),
            "task": name, "description": task.description, "train_examples": len(task.train),
            "test_examples": len(task.test), "zero_shot_accuracy": zero, "tuned_accuracy": tuned,
            "zero_shot_loss": m["zero_shot"]["val_loss"], "tuned_loss": m["epochs"][-1]["val_loss"],
            "epochs": m["epochs"], "train_seconds": m["train_seconds"], "eval_seconds": m["eval_seconds"],
            "wall_seconds": wall, "method": cfg.method, "num_virtual_tokens": cfg.num_virtual_tokens,
            "learning_rate": cfg.lr, "target_met": met(zero, tuned)}


def table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'task':<14}{'test n':>7}{'zero-shot':>11}{'tuned':>8}{'gain':>8}{'T=1':>7}{'tuned dec':>10}"
            f"{'train s':>9}{'total s':>9}  target")
    lines = [head, "-" * len(head)]
    for r in rows:
        gain = r["tuned_accuracy"] - r["zero_shot_accuracy"]
        lines.append(f"{r['task']:<14}{r['test_examples']:>7}{r['zero_shot_accuracy']:>11.1%}"
                     f"{r['tuned_accuracy']:>8.1%}{gain * 100:>+7.1f}p{_pct(r.get('client_default_accuracy')):>7}"
                     f"{_pct(r.get('tuned_decoding_accuracy')):>10}{r['train_seconds']:>9.1f}"
                     f"{r['wall_seconds']:>9.1f}  {'met' if r['target_met'] else 'MISSED'}")
    lines.append("T=1: the adapter sampled at temperature 1 (a client that sends no settings, without tuned "
                 "defaults); tuned dec: with the defaults its job picked (" +
                 "; ".join(f"{r['task']}: {r.get('tuned_decoding')}" for r in rows) + ")")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="checkpoint dir, .gguf file or bundled name")
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    parser.add_argument("--train-examples", type=int, default=64)
    parser.add_argument("--test-examples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    rows = []
    for name in names:
        rows.append(run_task(name, model=args.model, seed=args.seed, n_train=args.train_examples,
                             n_test=args.test_examples))
        log.info("%s: zero-shot %.3f -> tuned %.3f", name, rows[-1]["zero_shot_accuracy"],
                 rows[-1]["tuned_accuracy"])
    print(f"promptfleet bench quality: {args.model}, job defaults (method {rows[0]['method']}, "
          f"{rows[0]['num_virtual_tokens']} virtual tokens, lr {rows[0]['learning_rate']:g}), seed {args.seed}")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()

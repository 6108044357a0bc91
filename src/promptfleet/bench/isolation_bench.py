"""Does a training job starve the engine? Engine decode step time with no training, with a
job training in a thread of the same process (how the embedded worker trained before
issue 12), and with it training in the embedded worker's niced child process (now).

Each round measures every mode once, in turn, on the same engine (the machine is shared
and its speed drifts); the median of each mode over the rounds is reported. A mode's
training job runs until its measurement ends, then is cancelled. Prints ONE JSON line::

    python -m promptfleet.bench.isolation_bench [--shape gpt2] [--requests 8] [--rounds 3]

``--modes`` picks among idle, thread, child (niced, ``--train-threads``) and child-nice0
(the child without the nice: what the separate process alone buys).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from promptfleet.bench.common import bench_checkpoint, emit
from promptfleet.platform.config import EngineConfig, RepetitionConfig
from promptfleet.platform.engine import Engine
from promptfleet.platform.sampling import SamplingParams
from promptfleet.trainer.isolated import Isolation, default_train_threads, train_in_child
from promptfleet.trainer.train import TrainConfig, TrainingCancelled, train_dataset

log = logging.getLogger("promptfleet.bench.isolation")

MODES = ("idle", "thread", "child", "child-nice0")
WORDS = "model adapter fleet prompt token river stone cloud green table north quiet lamp seven apple".split()


def dataset(n: int, *, words: int = 24, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    return "".join(json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(words)) + " ->",
                               "completion": " " + " ".join(rng.choice(WORDS) for _ in range(8))}) + "\n"
                   for _ in range(n)).encode()


class Training:
    """One long training job in ``mode`` (thread | child | child-nice0), counting its steps."""

    def __init__(self, mode: str, cfg: TrainConfig, data: bytes, *, threads: int, nice: int) -> None:
        self.mode, self.cfg, self.data = mode, cfg, data
        self.isolation = Isolation(nice=nice if mode == "child" else 0, threads=threads)
        self.stop = threading.Event()
        self.steps: list[float] = []  # time of each step's end
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"bench-train-{mode}", daemon=True)

    def _progress(self, step: int, total: int, loss: float) -> None:
        self.steps.append(time.perf_counter())

    def _run(self) -> None:
        kwargs: dict[str, Any] = dict(max_example_tokens=1024, on_total=lambda _t: None, progress=self._progress,
                                      should_cancel=self.stop.is_set)
        try:
            if self.mode == "thread":
                train_dataset(self.cfg, self.data, **kwargs)
            else:
                train_in_child(self.cfg, self.data, isolation=self.isolation, **kwargs)
        except TrainingCancelled:
            pass
        except BaseException as exc:  # reported in the result
            self.error = exc

    def start(self, *, warm_steps: int = 2, timeout_s: float = 600.0) -> "Training":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while len(self.steps) < warm_steps and self.error is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if len(self.steps) < warm_steps:
            raise RuntimeError(f"training ({self.mode}) did not start stepping: {self.error!r}")
        return self

    def steps_per_s(self, t0: float, t1: float) -> float:
        return sum(t0 <= t <= t1 for t in self.steps) / (t1 - t0)

    def finish(self) -> None:
        self.stop.set()
        self._thread.join(120)


def measure_engine(engine: Engine, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict[str, float]:
    """Decode step time (ms, decode-only steps at the full batch) and generated tokens/s."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, detect_repetition=False)

    async def batch() -> None:
        await asyncio.gather(*[engine.complete(p, params) for p in prompts])

    s0, t0 = engine.stats(), time.perf_counter()
    for _ in range(repeats):
        asyncio.run(batch())
    s1, wall = engine.stats(), time.perf_counter() - t0
    decode_s, decode_tokens = s1.decode_seconds - s0.decode_seconds, s1.decode_row_tokens - s0.decode_row_tokens
    return {"decode_step_ms": 1000 * decode_s / max(1, decode_tokens) * len(prompts),
            "tok_s": repeats * len(prompts) * new_tokens / wall, "wall_s": wall}


def run_mode(mode: str, engine: Engine, measure: Callable[[], dict[str, float]], make_training: Callable[[str], Training]
             ) -> dict[str, float]:
    if mode == "idle":
        return measure()
    training = make_training(mode).start()
    try:
        t0 = time.perf_counter()
        out = measure()
        out["train_steps_per_s"] = training.steps_per_s(t0, time.perf_counter())
    finally:
        training.finish()
    if training.error is not None:
        raise RuntimeError(f"training ({mode}) failed: {training.error!r}")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint dir (default: a seeded random checkpoint of --shape)")
    ap.add_argument("--shape", default="gpt2", help="random checkpoint shape (tiny | small | gpt2)")
    ap.add_argument("--requests", type=int, default=8, help="concurrent requests: the decode batch")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="batches per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="idle,thread,child", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--train-threads", type=int, default=0, help="the child's torch threads (0: half the cores)")
    ap.add_argument("--train-nice", type=int, default=10)
    ap.add_argument("--train-batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := set(modes) - set(MODES):
        ap.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    ckpt = bench_checkpoint(args.model, shape=args.shape)
    engine = Engine.from_pretrained(ckpt, EngineConfig(device="cpu", max_batch_size=max(64, args.requests),
                                                       repetition=RepetitionConfig(enabled=False)))
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 50000, (args.prompt_tokens,), generator=gen).tolist() for _ in range(args.requests)]
    train_threads = args.train_threads or default_train_threads()
    cfg = TrainConfig(model_path=str(ckpt), num_virtual_tokens=20, epochs=1_000_000, batch_size=args.train_batch_size,
                      max_steps=1_000_000, seed=0)
    data = dataset(64)

    def measure() -> dict[str, float]:
        return measure_engine(engine, prompts, args.new_tokens, args.repeats)

    def make_training(mode: str) -> Training:
        return Training(mode, cfg, data, threads=train_threads, nice=args.train_nice)

    measure()  # warm-up
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            results[mode].append(run_mode(mode, engine, measure, make_training))
            log.warning("round %d %s: %s", r + 1, mode, results[mode][-1])
    engine.stop()

    def med(mode: str, key: str) -> float | None:
        values = [x[key] for x in results[mode] if key in x]
        return round(statistics.median(values), 2) if values else None

    out: dict[str, Any] = {
        "bench": "isolation", "model": f"gpt2 L{engine.model_config.n_layer} d{engine.model_config.n_embd} "
                                        "(random weights)" if not args.model else str(ckpt),
        "cores": len(os.sched_getaffinity(0)), "engine_threads": torch.get_num_threads(),
        "train_threads_child": train_threads, "train_nice": args.train_nice, "requests": args.requests,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    for mode in modes:
        out[f"{mode}_decode_step_ms"] = med(mode, "decode_step_ms")
        out[f"{mode}_tok_s"] = med(mode, "tok_s")
        if mode != "idle":
            out[f"{mode}_train_steps_per_s"] = med(mode, "train_steps_per_s")
    out["samples_decode_step_ms"] = {m: [round(x["decode_step_ms"], 1) for x in results[m]] for m in modes}
    emit(out)
    return out


if __name__ == "__main__":
    main()

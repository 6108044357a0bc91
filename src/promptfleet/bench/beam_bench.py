"""Beam-search benchmark (issue 18): our engine's beams against transformers' own.

Side by side in one run, on the same checkpoint (GPT-2-small shape with random weights by
default, or ``--model``), the same R prompts, k beams, N new tokens:
  (a) our engine: the R searches at once (every beam a row of the shared mixed batch,
      the prompt's K/V read in place by all k beams, forks copy a parent's own tokens only)
  (b) transformers ``generate(num_beams=k)`` one request at a time (cached: its KV cache
      holds k copies of the prompt and is reordered, all of it, every step)
  (c) transformers ``generate(num_beams=k)`` with the R prompts as one batch (same length
      prompts, so no padding changes the beams)
and reports finished searches per second, beam rows per second, the ratios, whether every
best beam equals transformers' (it must: ``parity``), and the KV bytes our forks copied
against what transformers' reorder moves (k x (prompt + t) positions per layer per step).

    python -m promptfleet.bench.beam_bench [--requests 8] [--beams 4] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from promptfleet.bench.common import bench_checkpoint, emit
from promptfleet.platform.beam_search import BeamParams
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.platform.kv_cache import token_bytes
from promptfleet.platform.sampling import SamplingParams
from promptfleet.platform.weights import resolve_checkpoint

log = logging.getLogger("promptfleet.bench.beams")


def _prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(100, vocab - 100, (length,), generator=gen).tolist() for _ in range(count)]


def _hf_beams(model, prompts: list[list[int]], *, beams: int, new_tokens: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             num_beams=beams, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


async def _engine_beams(engine: Engine, prompts: list[list[int]], *, beams: int,
                        new_tokens: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    results = await asyncio.gather(*(engine.beam_search(p, params, BeamParams(beams)) for p in prompts))
    return [r[0].token_ids for r in results]


def run(checkpoint: Path, *, requests: int, beams: int, new_tokens: int, prompt_len: int) -> dict:
    engine = Engine.from_pretrained(checkpoint, EngineConfig(max_batch_size=max(64, requests * beams)))
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = _prompts(requests, prompt_len, engine.model_config.vocab_size)
    copied = 0
    move = engine.cache.move

    def counting_move(src: int, dst: int, length: int, start: int = 0) -> None:
        nonlocal copied
        copied += max(0, length - start)
        move(src, dst, length, start)

    try:
        asyncio.run(_engine_beams(engine, prompts[:1], beams=beams, new_tokens=4))  # warm-up
        _hf_beams(model, prompts[:1], beams=beams, new_tokens=4)
        engine.cache.move = counting_move
        t0 = time.perf_counter()
        ours = asyncio.run(_engine_beams(engine, prompts, beams=beams, new_tokens=new_tokens))
        t_ours = time.perf_counter() - t0
        engine.cache.move = move
        t0 = time.perf_counter()
        one_by_one = [_hf_beams(model, [p], beams=beams, new_tokens=new_tokens)[0] for p in prompts]
        t_single = time.perf_counter() - t0
        t0 = time.perf_counter()
        batched = _hf_beams(model, prompts, beams=beams, new_tokens=new_tokens)
        t_batched = time.perf_counter() - t0
    finally:
        engine.stop()
    per_token = token_bytes(engine.model_config, engine.dtype)
    # transformers' reorder_cache: every step, k x (prompt + t) positions per layer, all layers
    hf_copied = sum(beams * (prompt_len + t) for t in range(1, new_tokens))
    rows = requests * beams * new_tokens
    return {
        "bench": "beams", "requests": requests, "beams": beams, "new_tokens": new_tokens, "prompt_tokens": prompt_len,
        "ours_searches_per_s": round(requests / t_ours, 3), "ours_beam_rows_per_s": round(rows / t_ours, 1),
        "hf_one_at_a_time_searches_per_s": round(requests / t_single, 3),
        "hf_batched_searches_per_s": round(requests / t_batched, 3),
        "ratio_vs_hf_one_at_a_time": round(t_single / t_ours, 2), "ratio_vs_hf_batched": round(t_batched / t_ours, 2),
        "parity_one_at_a_time": ours == one_by_one, "parity_batched": ours == batched,
        "kv_mb_copied_per_search_ours": round(copied * per_token / requests / 1e6, 2),
        "kv_mb_moved_per_search_hf_reorder": round(hf_copied * per_token / 1e6, 2),
        "load_average": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="promptfleet bench beams", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: a random GPT-2-small shape)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    checkpoint = resolve_checkpoint(str(bench_checkpoint(args.model)))
    result = run(checkpoint, requests=args.requests, beams=args.beams, new_tokens=args.new_tokens,
                 prompt_len=args.prompt_tokens)
    emit(result)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main()

"""Training throughput: our ``trainer.train`` next to a plain PEFT + transformers loop.

Both train a prompt-tuning adapter on the same backbone (default: a seeded random
checkpoint of the GPT-2-small shape), the same examples in the same batches, with AdamW,
on the same device, in the same process; rounds alternate between them and the best
round of each counts. Throughput covers the training steps (batching included), not
model loading or export. Prints ONE JSON line::

    python -m promptfleet.bench.train_bench [--model DIR] [--steps 6] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import time
from typing import Any

import torch
from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
from transformers import GPT2LMHeadModel

from promptfleet.bench.common import bench_checkpoint, emit
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.trainer.datasets import Example, parse_dataset
from promptfleet.trainer.train import TrainConfig, batch_order, train

log = logging.getLogger(__name__)

WORDS = ("model adapter fleet prompt token river stone cloud green table north quiet lamp seven apple "
         "review great terrible movie plot actor scene ending music story").split()


def make_examples(n: int, *, tokenizer: Any, prompt_words: int, completion_words: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    lines = [json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(prompt_words)) + " ->",
                         "completion": " " + " ".join(rng.choice(WORDS) for _ in range(completion_words))})
             for _ in range(n)]
    return parse_dataset(("\n".join(lines) + "\n").encode(), tokenizer=tokenizer, max_example_tokens=1024,
                         max_examples=n)


def plain_peft_loop(model_path: str, examples: list[Example], order: list[list[int]], *, num_virtual_tokens: int,
                    lr: float, seed: int, device: str) -> dict[str, float]:
    """The textbook loop: PEFT model, right padding, -100 labels on prompt and padding, AdamW."""
    base = GPT2LMHeadModel.from_pretrained(model_path, dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                    num_virtual_tokens=num_virtual_tokens,
                                                    prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    pad = base.config.eos_token_id
    model.train()
    seconds, n_examples, n_tokens = 0.0, 0, 0
    for indices in order:
        t0 = time.perf_counter()
        seqs = [list(examples[i].prompt_ids) + list(examples[i].completion_ids) for i in indices]
        width = max(len(s) for s in seqs)
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=device)
        attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        labels = torch.tensor([[-100] * len(examples[i].prompt_ids) + list(examples[i].completion_ids)
                               + [-100] * (width - len(s)) for i, s in zip(indices, seqs)], device=device)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        seconds += time.perf_counter() - t0
        n_examples += len(indices)
        n_tokens += int(attention_mask.sum())
    return {"examples_per_s": n_examples / seconds, "tokens_per_s": n_tokens / seconds, "seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint dir (default: random GPT-2-small shape)")
    parser.add_argument("--shape", default="gpt2")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-virtual-tokens", type=int, default=20)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--completion-words", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best of each side counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    ckpt = bench_checkpoint(args.model, shape=args.shape)
    tok = load_tokenizer(ckpt)
    examples = make_examples(args.steps * args.batch_size, tokenizer=tok, prompt_words=args.prompt_words,
                             completion_words=args.completion_words)
    seed, lr = 0, 3e-2
    order = batch_order(len(examples), batch_size=args.batch_size, steps=args.steps, seed=seed)
    cfg = TrainConfig(model_path=str(ckpt), method="prompt_tuning", num_virtual_tokens=args.num_virtual_tokens,
                      epochs=1, learning_rate=lr, batch_size=args.batch_size, max_steps=args.steps, seed=seed,
                      init="random_vocab", device=args.device)
    ours: list[dict[str, float]] = []
    plain: list[dict[str, float]] = []
    for _ in range(args.rounds):
        m = train(cfg, examples).metrics
        ours.append({"examples_per_s": m["examples_per_s"], "tokens_per_s": m["tokens_per_s"],
                     "seconds": m["train_seconds"]})
        plain.append(plain_peft_loop(str(ckpt), examples, order, num_virtual_tokens=args.num_virtual_tokens, lr=lr,
                                     seed=seed, device=args.device))
    best_ours = max(ours, key=lambda r: r["examples_per_s"])
    best_plain = max(plain, key=lambda r: r["examples_per_s"])
    result = {
        "bench": "train", "device": args.device, "threads": torch.get_num_threads(),
        "checkpoint": str(ckpt) if args.model else f"random-{args.shape}", "method": "prompt_tuning",
        "steps": args.steps, "batch_size": args.batch_size, "num_virtual_tokens": args.num_virtual_tokens,
        "avg_tokens_per_example": round(sum(e.num_tokens for e in examples) / len(examples), 1),
        "ours_examples_per_s": round(best_ours["examples_per_s"], 3),
        "ours_tokens_per_s": round(best_ours["tokens_per_s"], 1),
        "plain_examples_per_s": round(best_plain["examples_per_s"], 3),
        "plain_tokens_per_s": round(best_plain["tokens_per_s"], 1),
        "ratio": round(best_ours["examples_per_s"] / best_plain["examples_per_s"], 3),
        "target_ratio": 0.9,
        "rounds": {"ours_examples_per_s": [round(r["examples_per_s"], 3) for r in ours],
                   "plain_examples_per_s": [round(r["examples_per_s"], 3) for r in plain]},
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()

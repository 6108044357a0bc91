"""The prepared device check (issue 17, item 6): what a session with a GPU runs first,
through ``scripts/gpu_check.sh``; on CPU (``--device cpu --dtype float32``) the same
comparisons run as a dry run, which a test does on a tiny checkpoint so the script cannot rot.

Per attention backend that can run here (sdpa, flex, flash; ``--backends`` to choose):

1. logits against transformers' own model in the same dtype on the same device: a prefill
   per row, a chunk on each row's cached prefix, then decode steps of all rows together
   (through the engine's runner: CUDA graphs where the engine uses them); the mean
   |difference| over the vocabulary per position must stay within ``--logits-tol``
   (issue target: 1e-2 in fp16);
2. a mixed batch of prompt-tuning, P-tuning, prefix-tuning and no-adapter requests,
   greedy: the tokens must equal the SDPA engine's and PEFT's own full forward on the
   device, except where PEFT's two best logits are within ``--tie-tol`` (a near-tie that
   fp16 rounding may flip).

Prints one JSON report (also to ``--out``) and exits 1 when a check fails.

    python -m promptfleet.bench.gpu_check --device cuda --dtype float16
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from promptfleet.platform.adapter import load_adapter_dir
from promptfleet.platform.attention_backend import choose_attention
from promptfleet.platform.config import EngineConfig, ModelConfig, resolve_dtype
from promptfleet.platform.engine import Engine
from promptfleet.platform.kv_cache import SlotBatch, StepBatch
from promptfleet.platform.random_checkpoint import SHAPES, make_random_checkpoint
from promptfleet.platform.sampling import SamplingParams
from promptfleet.platform.step_input import StepInput

log = logging.getLogger("promptfleet.bench.gpu_check")

BACKENDS = ("sdpa", "flex", "flash")
ADAPTERS = {"prompt": ("prompt_tuning", 8, 1), "ptune": ("p_tuning", 5, 2), "prefix": ("prefix_tuning", 6, 3)}


@dataclass(frozen=True)
class CheckConfig:
    device: str = "cuda"
    dtype: str = "float16"
    model: Path | None = None        # default: a seeded random GPT-2-small-shaped checkpoint
    shape: str = "gpt2"              # the random checkpoint's shape (random_checkpoint.SHAPES)
    backends: tuple[str, ...] = ()   # default: every one of BACKENDS that can run here
    new_tokens: int = 8
    decode_steps: int = 4
    logits_tol: float = 1e-2
    tie_tol: float = 5e-2


def versions(device: torch.device) -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "peft", "triton", "flash_attn"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return out


def runnable_backends(device: torch.device, dtype: torch.dtype, head_dim: int) -> list[str]:
    ok = []
    for name in BACKENDS:
        try:
            choose_attention(name, device, dtype, head_dim)
        except ValueError as exc:
            log.info("backend %s skipped: %s", name, exc)
            continue
        ok.append(name)
    return ok


def hf_model(checkpoint: Path, adapter: Path | None, device: torch.device, dtype: torch.dtype):
    """transformers' model (wrapped by PEFT with ``adapter``) in ``dtype`` on ``device``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    return base if adapter is None else PeftModel.from_pretrained(base, adapter).to(device=device, dtype=dtype).eval()


@torch.inference_mode()
def _hf_logits(model, ids: list[int], device: torch.device) -> torch.Tensor:
    x = torch.tensor([ids], device=device)
    return model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()


@torch.inference_mode()
def _engine_logits(engine: Engine, ctx: SlotBatch, ids: list[int], positions: list[int]) -> torch.Tensor:
    dev = engine.device
    batch = StepInput(ids=torch.tensor([ids], device=dev), positions=torch.tensor([positions], device=dev),
                      ctx=StepBatch([ctx]), last=torch.arange(len(ids), device=dev))
    hidden = engine.runner.forward(batch)
    return engine.model.logits(hidden[0]).float()


def _gap(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (ours - ref).abs()
    return float(diff.mean(-1).max()), float(diff.max())


def logits_check(engine: Engine, hf, cfg: CheckConfig) -> dict:
    """Prefill, a chunk on the cached prefix, then decode steps of every row together."""
    gen = torch.Generator().manual_seed(0)
    vocab, dev, chunk = engine.model_config.vocab_size, engine.device, 5
    seqs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (13, 7, 21)]
    phases: dict[str, list[tuple[float, float]]] = {"prefill": [], "chunk_on_prefix": [], "decode": []}
    last: list[torch.Tensor] = []  # transformers' logits at each row's last position
    for slot, seq in enumerate(seqs):
        head, tail = seq[:-chunk], seq[-chunk:]
        ref = _hf_logits(hf, seq, dev)
        got = _engine_logits(engine, SlotBatch(engine.cache, slot, [0], [len(head)], len(head)), head,
                             list(range(len(head))))
        phases["prefill"].append(_gap(got, ref[: len(head)]))
        got = _engine_logits(engine, SlotBatch(engine.cache, slot, [len(head)], [chunk], chunk), tail,
                             list(range(len(head), len(seq))))
        phases["chunk_on_prefix"].append(_gap(got, ref[len(head):]))
        last.append(ref[-1:])
    for _ in range(cfg.decode_steps):  # every row decodes transformers' greedy token
        nxt = [int(ref.argmax()) for ref in last]
        for s, t in zip(seqs, nxt):
            s.append(t)
        lens = [len(s) - 1 for s in seqs]
        got = _engine_logits(engine, SlotBatch(engine.cache, 0, lens, [1] * len(seqs), 1), nxt, lens)
        last = [_hf_logits(hf, s, dev)[-1:] for s in seqs]
        phases["decode"].extend(_gap(got[r:r + 1], ref) for r, ref in enumerate(last))
    report = {name: {"mean_abs_max": max(g[0] for g in gaps), "max_abs": max(g[1] for g in gaps)}
              for name, gaps in phases.items()}
    report["ok"] = all(r["mean_abs_max"] <= cfg.logits_tol for r in report.values())
    return report


@torch.inference_mode()
def peft_greedy_with_margins(model, prompt: list[int], n: int, device: torch.device,
                             eos: int) -> tuple[list[int], list[float]]:
    """PEFT's full forward at every step (its cached generate is wrong for prompt learning:
    testing.peft), greedy; each step's gap between its two best logits."""
    seq, out, margins = list(prompt), [], []
    for _ in range(n):
        top = _hf_logits(model, seq, device)[-1].topk(2)
        token = int(top.indices[0])
        out.append(token)
        margins.append(float(top.values[0] - top.values[1]))
        seq.append(token)
        if token == eos:
            break
    return out, margins


def _agrees(got: list[int], want: list[int], margins: list[float], tie_tol: float) -> bool:
    """Equal, or equal up to a first difference where the reference had a near-tie."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return margins[i] <= tie_tol
    return len(got) == len(want) or (len(got) < len(want) and margins[len(got) - 1] <= tie_tol)


def _tally(got: list[list[int]], want: list[list[int]], reference: list[tuple[list[int], list[float]]],
           tie_tol: float) -> dict:
    """How many requests' tokens are equal, equal up to a near-tie, or differ (their indices)."""
    exact = sum(g == w for g, w in zip(got, want))
    differ = [i for i, (g, w, (_, m)) in enumerate(zip(got, want, reference)) if not _agrees(g, w, m, tie_tol)]
    return {"requests": len(got), "exact": exact, "near_tie": len(got) - exact - len(differ), "differ": differ}


async def _engine_tokens(engine: Engine, requests: list[tuple[str | None, list[int]]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0.0, detect_repetition=False)
    return [r.token_ids for r in await asyncio.gather(*[engine.complete(p, params, adapter=a) for a, p in requests])]


def run(cfg: CheckConfig) -> dict:
    device, t0 = torch.device(cfg.device), time.perf_counter()
    dtype = resolve_dtype(cfg.device, cfg.dtype)
    report: dict = {"config": {**asdict(cfg), "model": str(cfg.model)}, "versions": versions(device)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = cfg.model or make_random_checkpoint(Path(tmp) / "ckpt", shape=cfg.shape, seed=0, scale=3.0)
        mcfg = ModelConfig.from_pretrained(ckpt)
        backends = list(cfg.backends) or runnable_backends(device, dtype, mcfg.head_dim)
        report["backends"] = backends
        from promptfleet.testing.peft import make_peft_adapter

        adapters = {name: make_peft_adapter(ckpt, Path(tmp) / name, method, n, seed)
                    for name, (method, n, seed) in ADAPTERS.items()}
        gen = torch.Generator().manual_seed(1)
        names = ["prompt", None, "ptune", "prefix", "prompt", "prefix", None, "ptune"]
        requests = [(a, torch.randint(0, min(50000, mcfg.vocab_size), (3 + 2 * i,), generator=gen).tolist())
                    for i, a in enumerate(names)]
        models = {a: hf_model(ckpt, adapters[a] if a else None, device, dtype) for a in dict.fromkeys(names)}
        reference = [peft_greedy_with_margins(models[a], p, cfg.new_tokens, device, mcfg.eos_token_id)
                     for a, p in requests]
        del models
        base = hf_model(ckpt, None, device, dtype)
        answers: dict[str, list[list[int]]] = {}
        for backend in backends:
            t1 = time.perf_counter()
            engine = Engine.from_pretrained(ckpt, EngineConfig(device=cfg.device, dtype=cfg.dtype, attention=backend,
                                                               max_batch_size=8, max_model_len=128))
            try:
                entry: dict = {"logits": logits_check(engine, base, cfg), "picked": engine.attention_backend}
                for name, path in adapters.items():
                    engine.add_adapter(name, load_adapter_dir(path))
                answers[backend] = asyncio.run(_engine_tokens(engine, requests, cfg.new_tokens))
            finally:
                engine.stop()
            graphs = engine.runner.graphs  # which decode buckets ran as graphs (None: capture failed)
            entry["decode_graphs"] = None if graphs is None else {
                str(rows): bucket is not None for rows, bucket in sorted(graphs._buckets.items())}
            entry["tokens_vs_peft"] = _tally(answers[backend], [w for w, _ in reference], reference, cfg.tie_tol)
            if "sdpa" in answers:
                entry["tokens_vs_sdpa"] = _tally(answers[backend], answers["sdpa"], reference, cfg.tie_tol)
            entry["ok"] = entry["logits"]["ok"] and not entry["tokens_vs_peft"]["differ"] and not entry.get(
                "tokens_vs_sdpa", {"differ": []})["differ"]
            entry["seconds"] = round(time.perf_counter() - t1, 1)
            report[backend] = entry
            log.info("%s: %s", backend, "ok" if entry["ok"] else "FAILED")
    report["ok"] = bool(backends) and all(report[b]["ok"] for b in backends)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--model", type=Path, help="a GPT-2 checkpoint dir (default: seeded random weights)")
    ap.add_argument("--shape", default="gpt2", help="the random checkpoint's shape (tiny, small-test, gpt2, ...)")
    ap.add_argument("--backends", default="", help="comma-separated (default: every one that can run here)")
    ap.add_argument("--list-backends", action="store_true", help="print the runnable backends and exit")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--logits-tol", type=float, default=1e-2)
    ap.add_argument("--tie-tol", type=float, default=5e-2)
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.list_backends:
        shape = SHAPES[args.shape]
        head_dim = ModelConfig.from_pretrained(args.model).head_dim if args.model else shape["n_embd"] // shape["n_head"]
        print(" ".join(runnable_backends(torch.device(args.device), resolve_dtype(args.device, args.dtype), head_dim)))
        return 0
    cfg = CheckConfig(device=args.device, dtype=args.dtype, model=args.model, shape=args.shape,
                      backends=tuple(b for b in args.backends.split(",") if b), new_tokens=args.new_tokens,
                      logits_tol=args.logits_tol, tie_tol=args.tie_tol)
    report = run(cfg)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text)
        print("\n".join(summary(report)))
    else:
        print(text)
    return 0 if report["ok"] else 1


def summary(report: dict) -> list[str]:
    """One line per backend: the worst mean |logit difference| per phase and the token tallies."""
    lines = [" ".join(f"{k} {v}" for k, v in report["versions"].items())]
    for backend in report["backends"]:
        r = report[backend]
        gaps = ", ".join(f"{phase} {r['logits'][phase]['mean_abs_max']:.2e}"
                         for phase in ("prefill", "chunk_on_prefix", "decode"))
        tally = "; ".join(f"{name} {t['exact']}+{t['near_tie']} near-tie of {t['requests']}"
                          + (f", differ {t['differ']}" if t["differ"] else "")
                          for name, t in ((n, r.get(n)) for n in ("tokens_vs_peft", "tokens_vs_sdpa")) if t)
        graphs = r.get("decode_graphs")
        graphs = "off" if graphs is None else ", ".join(f"{k}{'' if v else ' (eager)'}" for k, v in graphs.items())
        lines.append(f"{backend}: {'ok' if r['ok'] else 'FAILED'} in {r['seconds']} s; mean |logit diff| {gaps}; "
                     f"{tally}; decode graphs: {graphs}")
    lines.append(f"gpu_check {'ok' if report['ok'] else 'FAILED'} in {report['seconds']} s")
    return lines


if __name__ == "__main__":
    sys.exit(main())

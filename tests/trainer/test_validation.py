"""The trainer proves its adapters: our batched greedy decoder equals PEFT's own full
forward, jobs hold out a validation split (or a second dataset) and store train loss,
validation loss and exact-match accuracy per epoch (plus the zero-shot baseline) on GPT-2
and Llama bases, early stopping stops and keeps the best epoch, and P-tuning adapters
serve through the engine exactly as PeftModel computes them."""
from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
import torch

from promptfleet.db import session_scope
from promptfleet.testing.peft import greedy_ids
from promptfleet.trainer.backbone import load_backbone, load_tokenizer
from promptfleet.trainer.datasets import DatasetLimits, parse_dataset
from promptfleet.trainer.evaluate import evaluate, exact_match, greedy_batch
from promptfleet.trainer.runner import WorkerContext, run_job
from promptfleet.trainer.schemas import JobRequest
from promptfleet.trainer.service import NotFound, create_dataset, get_job, submit_job
from promptfleet.trainer.train import TrainConfig, split_validation, train, train_dataset

WORDS = ["apple", "river", "stone", "cloud", "seven", "green", "table", "north", "quiet", "lamp"]


def jsonl(n: int, completion: str, seed: int = 0) -> bytes:
    rng = random.Random(seed)
    lines = [json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) + ":",
                         "completion": completion}) for _ in range(n)]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method", [None, "prompt_tuning", "p_tuning", "prefix_tuning"])
def test_batched_greedy_equals_the_full_forward(request, llama_checkpoint, prompt_learning_model, family, method):
    ckpt = llama_checkpoint if family == "llama" else request.getfixturevalue("tiny_checkpoint")
    model = prompt_learning_model(ckpt, method)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50257, (n,), generator=gen).tolist() for n in (3, 9, 1, 6, 4)]
    got = greedy_batch(model, prompts, max_new_tokens=7, eos_id=50256, pad_id=50256)
    assert got == [greedy_ids(model, p, 7, 50256) for p in prompts]
    assert len({tuple(t) for t in got}) > 1  # the prompts matter, so padding mistakes would show


def test_exact_match_normalises_whitespace_and_case_only():
    assert exact_match("  Positive ", "positive") and exact_match(" paris\nand more", " Paris")
    assert not exact_match(" positive.", " positive") and not exact_match(" pos itive", "positive")
    assert not exact_match(" a\nb", " a\nc")


def test_validation_split_is_seeded_and_automatic():
    items = list(range(30))
    train_part, held = split_validation(items, None, seed=1)
    assert len(held) == 3 and sorted(train_part + held) == items
    assert split_validation(items, None, seed=1) == (train_part, held) != split_validation(items, None, seed=2)
    assert split_validation(items[:19], None, seed=1)[1] == []  # under 20 examples: none held out
    assert len(split_validation(items[:5], 0.5, seed=0)[1]) == 2
    assert JobRequest(adapter_name="a", dataset_id="d").learning_rate == 0.1
    assert JobRequest(adapter_name="a", dataset_id="d", method="prefix_tuning").learning_rate == 1e-2
    with pytest.raises(ValueError, match="not both"):
        JobRequest(adapter_name="a", dataset_id="d", validation_fraction=0.2, validation_dataset_id="x")


@pytest.fixture
def job_runner(session_factory, storage, tenants, trainer_settings):
    """submit(checkpoint, train_bytes, validation_bytes=None, **request) -> the finished job."""

    def submit(checkpoint: Path, data: bytes, validation: bytes | None = None, tenant: int = 0, **request):
        tok = load_tokenizer(checkpoint)
        with session_scope(session_factory) as s:
            ds = create_dataset(s, storage=storage, tenant_id=tenants[tenant], data=data, tokenizer=tok,
                                limits=DatasetLimits())
            extra = {}
            if validation is not None:
                extra["validation_dataset_id"] = create_dataset(s, storage=storage, tenant_id=tenants[1],
                                                                data=validation, tokenizer=tok,
                                                                limits=DatasetLimits()).id
            req = JobRequest(**{"adapter_name": "val", "dataset_id": ds.id, **extra, **request})
            job = submit_job(s, tenant_id=tenants[tenant], request=req, enqueue=lambda _id: None,
                             max_active_jobs=10)
        ctx = WorkerContext(settings=trainer_settings.model_copy(update={"model": str(checkpoint)}))
        assert run_job(ctx, job.id, task_id="t", worker="w")["status"] == "succeeded"
        with session_scope(session_factory) as s:
            return get_job(s, tenant_id=tenants[tenant], job_id=job.id).to_dict()

    return submit


@pytest.mark.parametrize("family, method, lr", [("gpt2", "prefix_tuning", 0.3), ("llama", "prefix_tuning", 0.3)])
def test_job_stores_validation_metrics_per_epoch(request, job_runner, llama_checkpoint, family, method, lr):
    ckpt = llama_checkpoint if family == "llama" else request.getfixturevalue("tiny_checkpoint")
    job = job_runner(ckpt, jsonl(24, " the fleet sails"), method=method, learning_rate=lr, epochs=4,
                     batch_size=4, num_virtual_tokens=6, validation_fraction=0.25, seed=3)
    m = job["metrics"]
    assert m["validation_examples"] == 6 and m["steps"] == 4 * 5 == job["total_steps"]  # 18 train examples
    assert [e["epoch"] for e in m["epochs"]] == [1, 2, 3, 4] and [e["step"] for e in m["epochs"]] == [5, 10, 15, 20]
    for e in m["epochs"]:
        assert set(e) >= {"train_loss", "val_loss", "val_accuracy"} and 0.0 <= e["val_accuracy"] <= 1.0
    assert m["epochs"][0]["train_loss"] == pytest.approx(sum(m["loss"][:5]) / 5, abs=1e-5)
    zero = m["zero_shot"]
    assert m["epochs"][-1]["val_loss"] < 0.5 * zero["val_loss"], m  # it learned what the held-out set asks
    assert m["epochs"][-1]["val_accuracy"] > zero["val_accuracy"] == 0.0
    assert not m["stopped_early"] and m["best_epoch"] in (1, 2, 3, 4)


def test_validation_dataset_is_the_tenants_own(job_runner, tiny_checkpoint, session_factory, storage, tenants):
    """A second dataset as the validation set: scored on its examples, zero-shot included;
    another tenant's dataset is a NotFound."""
    with pytest.raises(NotFound, match="not found"):
        job_runner(tiny_checkpoint, jsonl(12, " yes"), validation=jsonl(5, " yes", seed=9), tenant=0)
    job = job_runner(tiny_checkpoint, jsonl(12, " yes"), validation=jsonl(5, " yes", seed=9), tenant=1,
                     method="prefix_tuning", learning_rate=0.3, epochs=2, batch_size=4, num_virtual_tokens=4)
    m = job["metrics"]
    assert m["validation_examples"] == 5 and len(m["epochs"]) == 2 and "zero_shot" in m
    assert job["params"]["validation_dataset_id"] and m["steps"] == 2 * 3  # all 12 train examples kept


def test_early_stopping_stops_and_keeps_the_best_epoch(tiny_checkpoint):
    """Training on " yes" + EOS while validation asks for " no no no no": after the first
    epoch validation loss rises (measured: 8.97, then 9.51), so patience 1 stops after
    epoch 2 and exports epoch 1's adapter."""
    tok = load_tokenizer(tiny_checkpoint)
    examples = parse_dataset(jsonl(16, " yes"), tokenizer=tok, max_example_tokens=64, max_examples=100)
    validation = parse_dataset(jsonl(6, " no no no no", seed=4), tokenizer=tok, max_example_tokens=64, max_examples=100)
    cfg = TrainConfig(model_path=str(tiny_checkpoint), method="prefix_tuning", num_virtual_tokens=4, epochs=8,
                      learning_rate=0.3, batch_size=4, seed=2, early_stopping_patience=1)
    epochs = []
    result = train(cfg, examples, validation=validation, on_epoch=epochs.append, keep_model=True)
    m = result.metrics
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and m["stopped_early"] and m["best_epoch"] == 1
    assert m["steps"] == 8 and len(m["loss"]) == 8  # 2 epochs of 4 steps, not 8 epochs
    assert m["epochs"][1]["val_loss"] >= m["epochs"][0]["val_loss"]
    again = evaluate(result.model, validation, tokenizer=tok, eos_id=50256, pad_id=50256)
    assert again.loss == pytest.approx(m["epochs"][0]["val_loss"], abs=1e-5)  # epoch 1's weights exported
    # without patience it trains every epoch
    cfg_all = TrainConfig(**{**cfg.__dict__, "early_stopping_patience": None, "epochs": 3})
    assert len(train(cfg_all, examples, validation=validation).metrics["epochs"]) == 3


async def test_p_tuning_adapter_serves_as_peft_computes_it(llama_checkpoint, tmp_path):
    """A P-tuning adapter trained here (PEFT's PromptEncoder MLP; saved as its output) is
    served by the engine with PeftModel's own greedy tokens. (This saturated random base
    learns slowly: the loss falls, which is all that is asked of it here.)"""
    from peft import PeftModel

    from promptfleet.platform.adapter import parse_adapter_files
    from promptfleet.platform.config import EngineConfig
    from promptfleet.platform.engine import Engine
    from promptfleet.platform.sampling import SamplingParams

    data = jsonl(16, " the fleet sails")
    cfg = TrainConfig(model_path=str(llama_checkpoint), method="p_tuning", num_virtual_tokens=6, epochs=3,
                      batch_size=4, learning_rate=3e-2, seed=4, validation_fraction=0.25)
    result = train_dataset(cfg, data, max_example_tokens=64)
    assert result.adapter_config["peft_type"] == "P_TUNING"
    m = result.metrics
    assert m["epochs"][-1]["val_loss"] < m["zero_shot"]["val_loss"] - 2.0, m
    out = tmp_path / "ptune"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(result.adapter_config))
    (out / "adapter_model.safetensors").write_bytes(result.safetensors_bytes)
    tok = load_tokenizer(llama_checkpoint)
    peft_model = PeftModel.from_pretrained(load_backbone(llama_checkpoint), str(out)).eval()
    engine = Engine.from_pretrained(llama_checkpoint, EngineConfig(max_batch_size=8))
    try:
        engine.add_adapter("ptune", parse_adapter_files((out / "adapter_config.json").read_bytes(),
                                                        result.safetensors_bytes))
        prompts = ["apple stone:", "quiet north lamp:", "something else entirely"]
        results = await asyncio.gather(*[engine.complete(p, SamplingParams(max_tokens=6, temperature=0.0,
                                                                           detect_repetition=False),
                                                         adapter="ptune") for p in prompts])
    finally:
        engine.stop()
    base = load_backbone(llama_checkpoint)
    changed = 0
    for prompt, got in zip(prompts, results):
        assert got.token_ids == greedy_ids(peft_model, tok.encode(prompt), 6, 50256), prompt
        changed += got.token_ids != greedy_ids(base, tok.encode(prompt), 6, 50256)
    assert changed  # the adapter changes the answers, so equality shows the engine applies it


def test_the_training_process_reports_each_epoch(tiny_checkpoint):
    """The embedded worker's child process sends the zero-shot and per-epoch evaluations
    over its pipe as they happen, and the validation dataset travels with the job."""
    from promptfleet.trainer.isolated import Isolation, train_in_child

    cfg = TrainConfig(model_path=str(tiny_checkpoint), method="prefix_tuning", num_virtual_tokens=4, epochs=2,
                      learning_rate=0.3, batch_size=4, seed=1)
    seen: list[dict] = []
    result = train_in_child(cfg, jsonl(8, " yes"), max_example_tokens=64, isolation=Isolation(threads=1),
                            validation_data=jsonl(3, " yes", seed=5), on_total=lambda total: None,
                            progress=lambda *a: None, on_epoch=seen.append, should_cancel=lambda: False)
    m = result.metrics
    assert [e["epoch"] for e in seen] == [0, 1, 2] and m["validation_examples"] == 3
    assert seen[1:] == m["epochs"] and seen[0]["val_loss"] == m["zero_shot"]["val_loss"]

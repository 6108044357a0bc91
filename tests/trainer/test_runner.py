"""``run_job`` in-process (what the Celery task calls), on SQLite and PostgreSQL:
registration exactly once, redelivery, failures, takeover of a silent worker's job, and
the registered adapter loading in PEFT to the model the training produced."""
from __future__ import annotations

import io
import zipfile
from datetime import timedelta

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load
from sqlalchemy import update
from transformers import GPT2LMHeadModel

from promptfleet.adapters.service import export_adapter, list_versions
from promptfleet.db import session_scope, utcnow
from promptfleet.platform.random_checkpoint import make_random_llama_checkpoint
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.testing.gguf import write_llama_gguf
from promptfleet.trainer import jobstate
from promptfleet.trainer.datasets import DatasetLimits, parse_dataset
from promptfleet.trainer.models import Dataset, TrainingJob
from promptfleet.trainer.runner import WorkerContext, run_job
from promptfleet.trainer.schemas import JobRequest
from promptfleet.trainer.service import create_dataset, get_job, submit_job
from promptfleet.trainer.train import TrainConfig, train


@pytest.fixture
def ctx(trainer_settings) -> WorkerContext:
    return WorkerContext(settings=trainer_settings)


@pytest.fixture
def submit(session_factory, storage, tenants, tiny_checkpoint, jsonl):
    tok = load_tokenizer(tiny_checkpoint)

    def _submit(tenant_id: str | None = None, data: bytes | None = None, **request):
        tenant_id = tenant_id or tenants[0]
        with session_scope(session_factory) as s:
            ds = create_dataset(s, storage=storage, tenant_id=tenant_id, data=data or jsonl(12), tokenizer=tok,
                                limits=DatasetLimits())
            req = JobRequest(**{"adapter_name": "ad", "dataset_id": ds.id, "max_steps": 4, "batch_size": 4,
                                "num_virtual_tokens": 4, "seed": 5, "learning_rate": 3e-2,
                                **request})
            return submit_job(s, tenant_id=tenant_id, request=req, enqueue=lambda _id: None, max_active_jobs=10)
    return _submit


def _job(session_factory, tenant_id: str, job_id: str) -> TrainingJob:
    with session_scope(session_factory) as s:
        return get_job(s, tenant_id=tenant_id, job_id=job_id)


def greedy(model, tok, prompt: str, n: int = 6) -> list[int]:
    ids = torch.tensor([tok.encode(prompt)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_succeeds_once_and_registered_adapter_is_what_was_trained(ctx, submit, session_factory, storage, tenants,
                                                                  tiny_checkpoint, jsonl, tmp_path):
    a = tenants[0]
    job = submit(method="prefix_tuning")
    assert run_job(ctx, job.id, task_id="t1", worker="w1")["status"] == "succeeded"
    done = _job(session_factory, a, job.id)
    assert (done.status, done.adapter, done.adapter_version, done.error) == ("succeeded", "ad@1", 1, None)
    assert done.progress == 1.0 and done.step == done.total_steps == 4 and done.attempts == 1
    assert len(done.metrics["loss"]) == 4 and done.metrics["tokens_per_s"] > 0 and done.finished_at is not None
    # a redelivered message does nothing: still one version
    assert run_job(ctx, job.id, task_id="t1", worker="w2") == {"job_id": job.id, "status": "skipped",
                                                               "reason": "already succeeded"}
    with session_scope(session_factory) as s:
        assert [v.version for v in list_versions(s, tenant_id=a, name="ad")] == [1]
        archive = export_adapter(s, storage=storage, tenant_id=a, ref="ad@1")
    # the registered files, loaded by PEFT, equal the in-memory model of the same training
    out = tmp_path / "exported"
    zipfile.ZipFile(io.BytesIO(archive)).extractall(out)
    tok = load_tokenizer(tiny_checkpoint)
    examples = parse_dataset(jsonl(12), tokenizer=tok, max_example_tokens=1000, max_examples=100)
    reference = train(TrainConfig(model_path=str(tiny_checkpoint), method="prefix_tuning", num_virtual_tokens=4,
                                  epochs=3, learning_rate=3e-2, batch_size=4, max_steps=4, seed=5),
                      examples, keep_model=True)
    assert (out / "adapter_model.safetensors").read_bytes() == reference.safetensors_bytes
    loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_checkpoint), str(out)).eval()
    for prompt in ["apple river:", "lamp:"]:
        assert greedy(loaded, tok, prompt) == greedy(reference.model.eval(), tok, prompt)
    # the next job for the same name becomes version 2
    job2 = submit()
    assert run_job(ctx, job2.id, task_id="t2", worker="w1")["adapter"] == "ad@2"


def test_failures_are_recorded_with_their_message(ctx, submit, session_factory, storage, tenants):
    a = tenants[0]
    job = submit()
    with session_scope(session_factory) as s:
        sha = s.get(Dataset, job.dataset_id).sha256
    storage.delete(sha)
    assert run_job(ctx, job.id, task_id="t", worker="w")["status"] == "failed"
    failed = _job(session_factory, a, job.id)
    assert failed.status == "failed" and "could not be read from blob storage" in failed.error
    assert failed.adapter is None and failed.finished_at is not None
    # a model path that does not exist
    bad = WorkerContext(settings=ctx.settings.model_copy(update={"model": str(ctx.settings.data_dir / "nope")}))
    job = submit()
    assert run_job(bad, job.id, task_id="t", worker="w")["status"] == "failed"
    assert _job(session_factory, a, job.id).error


def test_a_worker_serving_a_gguf_file_trains_on_it(ctx, submit, session_factory, storage, tenants, jsonl,
                                                    tmp_path):
    """PROMPTFLEET_MODEL may be a .gguf file (the demo serves SmolLM2's): the job reads the
    backbone's config and tokenizer from the file's metadata and trains what training on the
    safetensors directory the file was written from trains."""
    ckpt = make_random_llama_checkpoint(tmp_path / "llama", shape="llama-tiny", seed=8, scale=4.0)
    on_gguf = WorkerContext(settings=ctx.settings.model_copy(
        update={"model": str(write_llama_gguf(tmp_path / "llama.gguf", ckpt))}))
    job = submit()
    assert run_job(on_gguf, job.id, task_id="t", worker="w")["status"] == "succeeded"
    done = _job(session_factory, tenants[0], job.id)
    with session_scope(session_factory) as s:
        archive = export_adapter(s, storage=storage, tenant_id=tenants[0], ref=done.adapter)
    got = load(zipfile.ZipFile(io.BytesIO(archive)).read("adapter_model.safetensors"))
    examples = parse_dataset(jsonl(12), tokenizer=load_tokenizer(ckpt), max_example_tokens=1000, max_examples=100)
    reference = train(TrainConfig(model_path=str(ckpt), num_virtual_tokens=4, learning_rate=3e-2, batch_size=4,
                                  max_steps=4, seed=5), examples)
    want = load(reference.safetensors_bytes)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, atol=1e-6, rtol=0), name
    assert not torch.allclose(next(iter(want.values())), next(iter(load(_untrained(ckpt)).values())))


def _untrained(ckpt) -> bytes:
    """The same adapter before any step (so the comparison above is of trained weights)."""
    from promptfleet.trainer.batches import export_adapter as export_files
    from promptfleet.trainer.train import build_model

    return export_files(build_model(TrainConfig(model_path=str(ckpt), num_virtual_tokens=4, seed=5)))[1]


def test_a_silent_workers_job_is_taken_over_and_the_old_attempt_is_fenced(ctx, submit, session_factory, tenants):
    a = tenants[0]
    job = submit()
    with session_scope(session_factory) as s:  # attempt 1 claims, then its worker goes silent
        claim, _ = jobstate.claim_job(s, job_id=job.id, worker="dead", task_id="t", stale_after_s=3, max_attempts=3)
        s.execute(update(TrainingJob).where(TrainingJob.id == job.id)
                  .values(heartbeat_at=utcnow() - timedelta(seconds=10)))
    assert run_job(ctx, job.id, task_id="t", worker="alive")["status"] == "succeeded"
    done = _job(session_factory, a, job.id)
    assert done.attempts == 2 and done.worker == "alive" and done.adapter == "ad@1"
    with session_scope(session_factory) as s:  # the dead attempt can no longer write anything
        assert not jobstate.finish(s, job_id=job.id, attempt=claim.attempt, status="failed", error="late")
        assert jobstate.lock_for_finish(s, job_id=job.id, attempt=claim.attempt) == "lost"
    assert _job(session_factory, a, job.id).status == "succeeded"

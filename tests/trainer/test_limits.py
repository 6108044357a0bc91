"""Training limits (issue 12): a job's wall-clock limit, the example-pass budgets checked at
submit (per job, and per tenant over the last 24 h, on SQLite and PostgreSQL), and the
embedded worker's training process (niced, its own torch thread count)."""
from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
from safetensors.torch import load as safetensors_load
from sqlalchemy import func, select, update

from promptfleet.adapters.service import list_versions
from promptfleet.db import session_scope, utcnow
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.testing import wait_for
from promptfleet.trainer.celery_app import embedded_isolation, make_celery, make_enqueue, start_embedded_worker
from promptfleet.trainer.datasets import DatasetLimits, parse_dataset
from promptfleet.trainer.isolated import Isolation, TrainingFailed, train_in_child
from promptfleet.trainer.models import TrainingJob
from promptfleet.trainer.runner import WorkerContext, run_job
from promptfleet.trainer.schemas import JobRequest
from promptfleet.trainer.service import (TrainingBudget, TrainingBudgetExceeded, cancel_job, create_dataset,
                                         example_passes, get_job, submit_job)
from promptfleet.trainer.train import (TrainConfig, TrainingCancelled, WallClock, WallClockExceeded, train,
                                       train_dataset)

WALL_MESSAGE = "job exceeded the wall-clock limit of 0.5 s (PROMPTFLEET_JOB_MAX_WALL_S)"


@pytest.fixture
def dataset_of(session_factory, storage, tiny_checkpoint, jsonl):
    tok = load_tokenizer(tiny_checkpoint)

    def make(tenant_id: str, n: int) -> str:
        with session_scope(session_factory) as s:
            return create_dataset(s, storage=storage, tenant_id=tenant_id, data=jsonl(n), tokenizer=tok,
                                  limits=DatasetLimits()).id
    return make


def _submit(session_factory, tenant_id: str, dataset_id: str, budget: TrainingBudget, **request) -> TrainingJob:
    with session_scope(session_factory) as s:
        req = JobRequest(**{"adapter_name": "ad", "dataset_id": dataset_id, "batch_size": 4, "num_virtual_tokens": 4,
                            **request})
        return submit_job(s, tenant_id=tenant_id, request=req, enqueue=lambda _id: None, max_active_jobs=10,
                          budget=budget)


def _count_jobs(session_factory, tenant_id: str) -> int:
    with session_scope(session_factory) as s:
        return s.scalar(select(func.count()).select_from(TrainingJob).where(TrainingJob.tenant_id == tenant_id))


# --------------------------------------------------------------------------- wall clock
def test_the_training_loop_stops_at_the_wall_clock_limit(tiny_checkpoint, jsonl):
    examples = parse_dataset(jsonl(8), tokenizer=load_tokenizer(tiny_checkpoint), max_example_tokens=64,
                             max_examples=100)
    cfg = TrainConfig(model_path=str(tiny_checkpoint), num_virtual_tokens=4, epochs=1000, batch_size=4,
                      max_steps=100_000)
    steps: list[int] = []
    with pytest.raises(WallClockExceeded) as info:
        train(cfg, examples, progress=lambda step, total, loss: steps.append(step), wall_clock=WallClock(0.5))
    assert str(info.value).startswith(WALL_MESSAGE), str(info.value)
    assert 0 < len(steps) < 2000 and f"with {len(steps)} of 2000 steps done" in str(info.value)  # 1000 epochs x 2
    # without a limit (or under it) the same loop finishes
    short = TrainConfig(model_path=str(tiny_checkpoint), num_virtual_tokens=4, max_steps=2, batch_size=4)
    assert train(short, examples, wall_clock=WallClock(3600)).metrics["steps"] == 2


def test_a_job_over_its_wall_clock_limit_fails_and_registers_nothing(trainer_settings, session_factory, tenants,
                                                                      dataset_of):
    a = tenants[0]
    ctx = WorkerContext(settings=trainer_settings.model_copy(update={"job_max_wall_s": 0.5}))
    job = _submit(session_factory, a, dataset_of(a, 8), TrainingBudget(), epochs=1000, max_steps=100_000)
    outcome = run_job(ctx, job.id, task_id=None, worker="w1")
    assert outcome["status"] == "failed"
    with session_scope(session_factory) as s:
        done = get_job(s, tenant_id=a, job_id=job.id)
        assert done.status == "failed" and done.adapter is None and done.finished_at is not None
        assert done.error.startswith(WALL_MESSAGE), done.error
        assert list_versions(s, tenant_id=a, name="ad") == []


# --------------------------------------------------------------------------- example-pass budgets
def test_example_passes_counts_what_the_job_trains():
    req = JobRequest(adapter_name="a", dataset_id="d", epochs=3, batch_size=8)
    assert example_passes(num_examples=50_000, request=req) == (
        150_000, "3 epochs x 50,000 examples = 150,000 example-passes")
    # max_steps ends it sooner: 10 examples at batch 4 is 3 steps an epoch (4, 4, 2)
    capped = JobRequest(adapter_name="a", dataset_id="d", epochs=100, batch_size=4, max_steps=7)
    passes, described = example_passes(num_examples=10, request=capped)
    assert passes == 2 * 10 + 4 and "7 steps (max_steps) of batch_size 4" in described
    # a max_steps past the epochs changes nothing
    loose = JobRequest(adapter_name="a", dataset_id="d", epochs=2, batch_size=4, max_steps=1000)
    assert example_passes(num_examples=10, request=loose)[0] == 20


def test_a_job_over_the_per_job_budget_is_refused_at_submit(session_factory, tenants, dataset_of):
    a = tenants[0]
    ds = dataset_of(a, 12)
    with pytest.raises(TrainingBudgetExceeded) as info:
        _submit(session_factory, a, ds, TrainingBudget(per_job=30), epochs=3)
    assert str(info.value) == ("this job would train 3 epochs x 12 examples = 36 example-passes, over the per-job "
                               "budget of 30 (PROMPTFLEET_JOB_MAX_TRAIN_EXAMPLES)")
    assert _count_jobs(session_factory, a) == 0
    job = _submit(session_factory, a, ds, TrainingBudget(per_job=30), epochs=2)  # 24: fits
    assert job.status == "queued" and job.example_passes == 24
    assert _submit(session_factory, a, ds, TrainingBudget(per_job=0), epochs=1000).example_passes == 12_000


def test_the_daily_budget_counts_the_tenants_recent_jobs_that_ran(session_factory, tenants, dataset_of):
    a, b = tenants
    ds_a, ds_b = dataset_of(a, 10), dataset_of(b, 10)
    budget = TrainingBudget(per_tenant_day=50)
    first = _submit(session_factory, a, ds_a, budget, epochs=3)  # 30
    with pytest.raises(TrainingBudgetExceeded) as info:
        _submit(session_factory, a, ds_a, budget, epochs=3)
    assert str(info.value) == (
        "this job would train 3 epochs x 10 examples = 30 example-passes; with the 30 of this tenant's jobs from the "
        "last 24 h that makes 60, over the per-tenant daily budget of 50 (PROMPTFLEET_TENANT_TRAIN_EXAMPLES_PER_DAY)")
    assert _count_jobs(session_factory, a) == 1
    # another tenant's budget is its own
    assert _submit(session_factory, b, ds_b, budget, epochs=5).status == "queued"
    # a job cancelled before it started trained nothing, so it frees its share
    with session_scope(session_factory) as s:
        assert cancel_job(s, tenant_id=a, job_id=first.id).status == "cancelled"
    second = _submit(session_factory, a, ds_a, budget, epochs=3)
    # one that started counts even when it ends failed or cancelled
    with session_scope(session_factory) as s:
        s.execute(update(TrainingJob).where(TrainingJob.id == second.id)
                  .values(status="failed", started_at=utcnow(), finished_at=utcnow()))
    with pytest.raises(TrainingBudgetExceeded):
        _submit(session_factory, a, ds_a, budget, epochs=3)
    # and a job created more than 24 h ago no longer does
    with session_scope(session_factory) as s:
        s.execute(update(TrainingJob).where(TrainingJob.id == second.id)
                  .values(created_at=utcnow() - timedelta(hours=24, minutes=1)))
    assert _submit(session_factory, a, ds_a, budget, epochs=5).example_passes == 50


# --------------------------------------------------------------------------- the training process
def test_embedded_isolation_follows_the_settings(trainer_settings):
    assert embedded_isolation(trainer_settings.model_copy(update={"train_threads": 3, "train_nice": 12})) == \
        Isolation(nice=12, threads=3)
    default = embedded_isolation(trainer_settings)
    assert default is not None and default.nice == 10 and default.threads == max(1, len(os.sched_getaffinity(0)) // 2)
    assert embedded_isolation(trainer_settings.model_copy(update={"embedded_train_subprocess": False})) is None


def test_the_training_process_is_niced_with_its_own_thread_count(tiny_checkpoint, jsonl):
    cfg = TrainConfig(model_path=str(tiny_checkpoint), num_virtual_tokens=4, max_steps=3, batch_size=4)
    threads_before = torch.get_num_threads()
    totals, steps = [], []
    result = train_in_child(cfg, jsonl(12), max_example_tokens=64, isolation=Isolation(nice=11, threads=2),
                            on_total=totals.append, progress=lambda step, total, loss: steps.append(step),
                            should_cancel=lambda: False)
    iso = result.metrics["isolation"]
    assert iso["pid"] != os.getpid()
    assert iso["nice"] >= 11, iso  # the least nice of ALL its threads, torch's included
    assert iso["torch_threads"] == 2
    assert torch.get_num_threads() == threads_before  # this process is untouched
    assert totals == [3] and steps == [1, 2, 3] and result.metrics["steps"] == 3
    # the same adapter as training in this process (to rounding: 2 threads reduce in another order)
    here = train_dataset(cfg, jsonl(12), max_example_tokens=64)
    theirs, ours = safetensors_load(result.safetensors_bytes), safetensors_load(here.safetensors_bytes)
    assert theirs.keys() == ours.keys() and all(torch.allclose(theirs[k], ours[k], atol=1e-5) for k in ours)

    with pytest.raises(TrainingCancelled):
        train_in_child(cfg, jsonl(12), max_example_tokens=64, isolation=Isolation(), on_total=totals.append,
                       progress=lambda *a: None, should_cancel=lambda: True)
    with pytest.raises(WallClockExceeded, match="wall-clock limit of 0.5 s"):
        train_in_child(cfg, jsonl(12), max_example_tokens=64, isolation=Isolation(), on_total=totals.append,
                       progress=lambda *a: None, should_cancel=lambda: False, wall_clock=WallClock(0.5, started=0.0))
    with pytest.raises(TrainingFailed, match="DatasetError: line 1"):
        train_in_child(cfg, b"not json\n", max_example_tokens=64, isolation=Isolation(), on_total=totals.append,
                       progress=lambda *a: None, should_cancel=lambda: False)


@pytest.mark.parametrize("empty_db_url", ["sqlite"], indirect=True)
def test_the_embedded_worker_trains_in_its_niced_process(trainer_settings, session_factory, tenants, dataset_of):
    a = tenants[0]
    settings = trainer_settings.model_copy(update={"train_threads": 1, "train_nice": 10})
    app = make_celery(settings)
    worker = start_embedded_worker(app)
    try:
        job = _submit(session_factory, a, dataset_of(a, 8), TrainingBudget(), max_steps=3)
        make_enqueue(app)(job.id)  # _submit's enqueue sent nothing

        def status():
            with session_scope(session_factory) as s:
                return get_job(s, tenant_id=a, job_id=job.id)

        done = wait_for(lambda: (j := status()).status in ("succeeded", "failed") and j, timeout=120,
                        what="the embedded worker to finish the job")
    finally:
        worker.stop(timeout=30)
    assert (done.status, done.error, done.adapter) == ("succeeded", None, "ad@1")
    iso = done.metrics["isolation"]
    assert iso["pid"] != os.getpid() and iso["nice"] >= 10 and iso["torch_threads"] == 1

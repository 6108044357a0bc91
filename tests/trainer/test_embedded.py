"""The embedded mode: SQLite metadata, SQLite broker file, a solo worker in a thread."""
from __future__ import annotations

import pytest

from promptfleet.adapters.service import list_versions
from promptfleet.db import session_scope
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.testing import wait_for
from promptfleet.trainer.celery_app import make_celery, make_enqueue, start_embedded_worker
from promptfleet.trainer.datasets import DatasetLimits
from promptfleet.trainer.schemas import JobRequest
from promptfleet.trainer.service import cancel_job, create_dataset, get_job, submit_job


@pytest.mark.parametrize("empty_db_url", ["sqlite"], indirect=True)
def test_embedded_worker_runs_a_job_to_success(trainer_settings, session_factory, storage, tenants, jsonl,
                                               tiny_checkpoint):
    assert trainer_settings.resolved_broker_url().startswith("sqla+sqlite:///")
    a = tenants[0]
    app = make_celery(trainer_settings)
    worker = start_embedded_worker(app)
    try:
        assert worker.alive and worker.error is None
        with session_scope(session_factory) as s:
            ds = create_dataset(s, storage=storage, tenant_id=a, data=jsonl(8),
                                tokenizer=load_tokenizer(tiny_checkpoint), limits=DatasetLimits())
            req = JobRequest(adapter_name="emb", dataset_id=ds.id, max_steps=3, batch_size=4, num_virtual_tokens=4)
            job = submit_job(s, tenant_id=a, request=req, enqueue=make_enqueue(app))
        assert job.celery_task_id

        def status():
            with session_scope(session_factory) as s:
                return get_job(s, tenant_id=a, job_id=job.id)

        done = wait_for(lambda: status().status in ("succeeded", "failed") and status(), timeout=120,
                        what="the embedded worker to finish the job")
        assert (done.status, done.adapter, done.error) == ("succeeded", "emb@1", None)
        with session_scope(session_factory) as s:
            assert [v.version for v in list_versions(s, tenant_id=a, name="emb")] == [1]
            # a job still queued when cancelled never runs
            req2 = JobRequest(adapter_name="emb2", dataset_id=ds.id, max_steps=3, batch_size=4)
            queued = submit_job(s, tenant_id=a, request=req2, enqueue=lambda _id: None)
            assert cancel_job(s, tenant_id=a, job_id=queued.id).status == "cancelled"
    finally:
        worker.stop(timeout=30)
    assert not worker.alive


@pytest.mark.parametrize("empty_db_url", ["sqlite"], indirect=True)
def test_stopping_the_embedded_worker_requeues_the_running_job(trainer_settings, session_factory, storage, tenants,
                                                               jsonl, tiny_checkpoint):
    a = tenants[0]
    app = make_celery(trainer_settings)
    with session_scope(session_factory) as s:
        ds = create_dataset(s, storage=storage, tenant_id=a, data=jsonl(8), tokenizer=load_tokenizer(tiny_checkpoint),
                            limits=DatasetLimits())
        req = JobRequest(adapter_name="again", dataset_id=ds.id, epochs=1000, max_steps=60, batch_size=4,
                         num_virtual_tokens=4)
        job = submit_job(s, tenant_id=a, request=req, enqueue=make_enqueue(app))

    def status():
        with session_scope(session_factory) as s:
            return get_job(s, tenant_id=a, job_id=job.id)

    worker = start_embedded_worker(app)
    try:
        wait_for(lambda: status().status == "running" and status().step >= 1, timeout=60, what="the job to start")
    finally:
        worker.stop(timeout=30)
    assert not worker.alive
    interrupted = status()
    assert interrupted.status == "queued" and "worker shutdown" in interrupted.error, interrupted.to_dict()
    # the next server start picks it up again and finishes it (attempt 2), one adapter
    worker = start_embedded_worker(make_celery(trainer_settings))
    try:
        done = wait_for(lambda: (j := status()).status not in ("queued", "running") and j, timeout=90,
                        what="the re-queued job to finish")
    finally:
        worker.stop(timeout=30)
    assert (done.status, done.attempts, done.adapter, done.step) == ("succeeded", 2, "again@1", 60)
    with session_scope(session_factory) as s:
        assert [v.version for v in list_versions(s, tenant_id=a, name="again")] == [1]

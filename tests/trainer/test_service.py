"""Trainer service on SQLite and PostgreSQL: datasets, submission limits, isolation,
cancellation and the reaper's semantics (no broker: ``enqueue`` records job ids)."""
from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError
from sqlalchemy import update

from promptfleet.db import session_scope, utcnow
from promptfleet.migrate import downgrade, upgrade
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.trainer import jobstate, service
from promptfleet.trainer.datasets import DatasetError, DatasetLimits
from promptfleet.trainer.models import TrainingJob
from promptfleet.trainer.schemas import JobRequest
from promptfleet.trainer.service import (DatasetTooLarge, EnqueueError, JobNotCancellable, NotFound, TooManyJobs,
                                         cancel_job, create_dataset, get_dataset, get_job, list_jobs,
                                         reap_stale_jobs, resend_queued_jobs, submit_job)

LIMITS = DatasetLimits(max_bytes=1 << 20, max_examples=1000, max_example_tokens=64)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


class Enqueued(list):
    def __call__(self, job_id: str) -> str:
        self.append(job_id)
        return f"task-{len(self)}"


@pytest.fixture
def dataset_a(session_factory, storage, tenants, tok, jsonl):
    with session_scope(session_factory) as s:
        return create_dataset(s, storage=storage, tenant_id=tenants[0], data=jsonl(10), tokenizer=tok, limits=LIMITS)


def test_create_dataset_stores_blob_and_counts(session_factory, storage, tenants, tok, jsonl, dataset_a):
    assert dataset_a.num_examples == 10 and dataset_a.num_tokens > 20 and dataset_a.size_bytes == len(jsonl(10))
    assert storage.get(dataset_a.sha256) == jsonl(10)
    with session_scope(session_factory) as s:
        assert get_dataset(s, tenant_id=tenants[0], dataset_id=dataset_a.id).sha256 == dataset_a.sha256
        with pytest.raises(NotFound):
            get_dataset(s, tenant_id=tenants[1], dataset_id=dataset_a.id)
        with pytest.raises(NotFound):
            get_dataset(s, tenant_id=tenants[0], dataset_id="0" * 32)
        with pytest.raises(DatasetError, match="^line 2: "):
            create_dataset(s, storage=storage, tenant_id=tenants[0], data=b'{"prompt":"a","completion":"b"}\n{}\n',
                           tokenizer=tok, limits=LIMITS)
        with pytest.raises(DatasetTooLarge):
            create_dataset(s, storage=storage, tenant_id=tenants[0], data=jsonl(10), tokenizer=tok,
                           limits=DatasetLimits(max_bytes=100))
        assert len(service.list_datasets(s, tenant_id=tenants[0])) == 1
        assert service.list_datasets(s, tenant_id=tenants[1]) == []


def test_job_request_validation():
    req = JobRequest(adapter_name="my-adapter", dataset_id="d" * 32)
    assert req.init == "random_vocab" and req.method == "prompt_tuning"
    assert JobRequest(adapter_name="a", dataset_id="d", init_text="Classify:").init == "text"
    assert JobRequest(adapter_name="a", dataset_id="d", init="random").params()["init"] == "random"
    for bad in [{"adapter_name": "bad name"}, {"adapter_name": "x@1"}, {"num_virtual_tokens": 0},
                {"num_virtual_tokens": 513}, {"learning_rate": 0}, {"batch_size": 0}, {"epochs": 0},
                {"method": "lora"}, {"init": "text"}, {"init_text": "  "}, {"max_steps": 0}, {"unknown": 1}]:
        with pytest.raises(ValidationError):
            JobRequest(**{"adapter_name": "a", "dataset_id": "d", **bad})


def test_submit_isolation_limit_and_listing(session_factory, tenants, dataset_a):
    a, b = tenants
    enqueue = Enqueued()
    req = JobRequest(adapter_name="ad", dataset_id=dataset_a.id, max_steps=3)
    with session_scope(session_factory) as s:
        with pytest.raises(NotFound):  # B cannot train on A's dataset
            submit_job(s, tenant_id=b, request=req, enqueue=enqueue)
        j1 = submit_job(s, tenant_id=a, request=req, enqueue=enqueue, max_active_jobs=2)
        j2 = submit_job(s, tenant_id=a, request=req, enqueue=enqueue, max_active_jobs=2)
    with pytest.raises(TooManyJobs), session_scope(session_factory) as s:
        submit_job(s, tenant_id=a, request=req, enqueue=enqueue, max_active_jobs=2)
    assert enqueue == [j1.id, j2.id]
    assert j1.status == "queued" and j1.celery_task_id == "task-1" and j1.params["max_steps"] == 3
    with session_scope(session_factory) as s:
        assert {j.id for j in list_jobs(s, tenant_id=a)} == {j1.id, j2.id}
        assert list_jobs(s, tenant_id=b) == []
        with pytest.raises(NotFound):
            get_job(s, tenant_id=b, job_id=j1.id)
        with pytest.raises(NotFound):
            cancel_job(s, tenant_id=b, job_id=j1.id)
        # cancelling a queued job is immediate and frees a slot
        assert cancel_job(s, tenant_id=a, job_id=j1.id).status == "cancelled"
        assert cancel_job(s, tenant_id=a, job_id=j1.id).status == "cancelled"  # idempotent
        j3 = submit_job(s, tenant_id=a, request=req, enqueue=enqueue, max_active_jobs=2)
        queued = list_jobs(s, tenant_id=a, status="queued")
        assert {j.id for j in queued} == {j2.id, j3.id}
        assert [j.created_at for j in queued] == sorted((j.created_at for j in queued), reverse=True)


def test_enqueue_failure_marks_the_job_failed(session_factory, tenants, dataset_a):
    def broken(job_id: str) -> str:
        raise ConnectionError("broker down")

    with session_scope(session_factory) as s:
        with pytest.raises(EnqueueError, match="broker down"):
            submit_job(s, tenant_id=tenants[0], request=JobRequest(adapter_name="x", dataset_id=dataset_a.id),
                       enqueue=broken)
        (job,) = list_jobs(s, tenant_id=tenants[0])
        assert job.status == "failed" and "broker down" in job.error


def _claim(session_factory, job_id: str, worker: str = "w1"):
    with session_scope(session_factory) as s:
        claim, why = jobstate.claim_job(s, job_id=job_id, worker=worker, task_id="t", stale_after_s=30,
                                        max_attempts=3)
    return claim, why


def _age_heartbeat(session_factory, job_id: str, seconds: float) -> None:
    with session_scope(session_factory) as s:
        s.execute(update(TrainingJob).where(TrainingJob.id == job_id)
                  .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def test_claim_fencing_cancel_and_reaper(session_factory, tenants, dataset_a):
    a = tenants[0]
    enqueue = Enqueued()
    req = JobRequest(adapter_name="ad", dataset_id=dataset_a.id)
    with session_scope(session_factory) as s:
        job = submit_job(s, tenant_id=a, request=req, enqueue=enqueue, max_active_jobs=5)
    claim, why = _claim(session_factory, job.id)
    assert claim is not None and claim.attempt == 1 and why == "claimed"
    assert _claim(session_factory, job.id, "w2") == (None, "running on w1")  # duplicate delivery dropped
    # a running job: cancel only raises the flag; the worker's heartbeat sees it
    with session_scope(session_factory) as s:
        assert cancel_job(s, tenant_id=a, job_id=job.id).status == "running"
        assert jobstate.heartbeat(s, job_id=job.id, attempt=1, step=2, total_steps=10, metrics=None) == "cancel"
        assert get_job(s, tenant_id=a, job_id=job.id).progress == pytest.approx(0.2)
    # a fresh heartbeat is left alone; a stale one with a cancel pending becomes cancelled
    with session_scope(session_factory) as s:
        assert reap_stale_jobs(s, stale_after_s=30, enqueue=enqueue) == []
    _age_heartbeat(session_factory, job.id, 60)
    with session_scope(session_factory) as s:
        assert [j.id for j in reap_stale_jobs(s, stale_after_s=30, enqueue=enqueue)] == [job.id]
        assert get_job(s, tenant_id=a, job_id=job.id).status == "cancelled"

    # a job whose worker died: re-queued while attempts remain, then failed "worker lost"
    with session_scope(session_factory) as s:
        job2 = submit_job(s, tenant_id=a, request=req, enqueue=enqueue, max_active_jobs=5)
    for attempt in (1, 2, 3):
        claim, why = _claim(session_factory, job2.id, f"w{attempt}")
        assert claim is not None and claim.attempt == attempt, why
        _age_heartbeat(session_factory, job2.id, 60)
        with session_scope(session_factory) as s:
            (reaped,) = reap_stale_jobs(s, stale_after_s=30, max_attempts=3, enqueue=enqueue)
            assert reaped.id == job2.id
            job_row = get_job(s, tenant_id=a, job_id=job2.id)
            # the old attempt's writes no longer land
            assert jobstate.heartbeat(s, job_id=job2.id, attempt=attempt, step=1, total_steps=2, metrics=None) == "lost"
        if attempt < 3:
            assert job_row.status == "queued" and "re-queued" in job_row.error and enqueue[-1] == job2.id
        else:
            assert job_row.status == "failed" and job_row.error.startswith("worker lost: no heartbeat")
    with session_scope(session_factory) as s:
        with pytest.raises(JobNotCancellable):
            cancel_job(s, tenant_id=a, job_id=job2.id)


def test_migration_down_and_up(db_url):
    from sqlalchemy import inspect

    from promptfleet.db import make_engine

    def tables() -> set[str]:
        engine = make_engine(db_url)
        try:
            return set(inspect(engine).get_table_names())
        finally:
            engine.dispose()

    assert {"datasets", "training_jobs"} <= tables()
    downgrade(db_url, "0001_registry")
    assert not {"datasets", "training_jobs"} & tables() and "tenants" in tables()
    upgrade(db_url)
    assert {"datasets", "training_jobs"} <= tables()


def test_models_match_migration(db_url):
    """Autogenerate finds no difference between the trainer's ORM models and 0002_trainer."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from promptfleet.db import Base, make_engine

    def ours(obj, name, type_, reflected, compare_to) -> bool:
        table = obj if type_ == "table" else getattr(obj, "table", None)
        return table is not None and table.name in {"datasets", "training_jobs"}

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"include_object": ours, "compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_a_queued_job_whose_message_was_lost_is_sent_again_once(session_factory, tenants, dataset_a):
    """A broker that keeps nothing on disk forgets queued messages when it restarts: a job
    still queued ``older_than_s`` after its last send is sent again, once per interval
    (the bump is a conditional update), never once claimed, and a broker that refuses
    now leaves it queued for the next round."""
    enqueue = Enqueued()
    req = JobRequest(adapter_name="ad", dataset_id=dataset_a.id)
    with session_scope(session_factory) as s:
        job = submit_job(s, tenant_id=tenants[0], request=req, enqueue=enqueue, max_active_jobs=5)
        running = submit_job(s, tenant_id=tenants[0], request=req, enqueue=enqueue, max_active_jobs=5)
    assert enqueue == [job.id, running.id]
    assert _claim(session_factory, running.id)[0] is not None
    with session_scope(session_factory) as s:
        assert resend_queued_jobs(s, older_than_s=300, enqueue=enqueue) == []  # just sent
    with session_scope(session_factory) as s:
        s.execute(update(TrainingJob).values(enqueued_at=utcnow() - timedelta(seconds=400)))

    def broker_down(job_id: str) -> str:
        raise ConnectionError("broker unreachable")

    with session_scope(session_factory) as s:
        assert resend_queued_jobs(s, older_than_s=300, enqueue=broker_down) == []
        assert s.get(TrainingJob, job.id).status == "queued"
    with session_scope(session_factory) as s:  # the failed attempt counted as a send: wait again
        assert resend_queued_jobs(s, older_than_s=300, enqueue=enqueue) == []
        s.execute(update(TrainingJob).values(enqueued_at=utcnow() - timedelta(seconds=400)))
    with session_scope(session_factory) as s:
        assert resend_queued_jobs(s, older_than_s=300, enqueue=enqueue) == [job.id]
        assert resend_queued_jobs(s, older_than_s=300, enqueue=enqueue) == []  # once per interval
        assert s.get(TrainingJob, job.id).celery_task_id == f"task-{len(enqueue)}"
    assert enqueue == [job.id, running.id, job.id]
    # the duplicate delivery of a message that was only slow is dropped by the claim
    assert _claim(session_factory, job.id, "w1")[0] is not None
    assert _claim(session_factory, job.id, "w2") == (None, "running on w1")

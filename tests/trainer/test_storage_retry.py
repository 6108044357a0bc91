"""A worker outlasts a blob-store outage: ``with_storage_retry`` on its own, then ``run_job``
on a real S3 server (moto) behind a proxy the test takes away and brings back intact: a job
whose dataset read or adapter write meets the outage waits (heartbeating) and succeeds once
the store returns, exactly once; past ``job_storage_retry_s`` it fails and says why, with no
adapter registered."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from promptfleet.adapters.service import list_versions, load_adapter_weights
from promptfleet.adapters.storage import BlobNotFoundError, StorageUnavailable
from promptfleet.db import session_scope
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.settings import Settings
from promptfleet.testing.polling import wait_for
from promptfleet.testing.s3 import s3_bucket, s3_endpoint, s3_proxy  # noqa: F401
from promptfleet.trainer import runner
from promptfleet.trainer.datasets import DatasetLimits
from promptfleet.trainer.runner import WorkerContext, run_job
from promptfleet.trainer.schemas import JobRequest
from promptfleet.trainer.service import create_dataset, get_job, submit_job
from promptfleet.trainer.storage_retry import StorageRetry, StorageRetryStopped, with_storage_retry

FAST = StorageRetry(budget_s=5.0, initial_s=0.01, max_s=0.05)


class Script:
    """A callable that answers a scripted sequence of outcomes (exceptions are raised)."""

    def __init__(self, *outcomes) -> None:
        self.outcomes, self.calls = list(outcomes), 0

    def __call__(self):
        self.calls += 1
        out = self.outcomes.pop(0)
        if isinstance(out, BaseException):
            raise out
        return out


def test_retries_only_unavailability_then_returns():
    beats = []
    fn = Script(StorageUnavailable("down"), StorageUnavailable("down"), b"data")
    assert with_storage_retry(fn, policy=FAST, what="x", between=lambda: beats.append(1)) == b"data"
    assert fn.calls == 3 and len(beats) == 2
    missing = Script(BlobNotFoundError("gone"), b"never")
    with pytest.raises(BlobNotFoundError):
        with_storage_retry(missing, policy=FAST, what="x")
    assert missing.calls == 1  # a missing blob would only be missing again


def test_budget_is_bounded_and_stop_is_honoured():
    policy = StorageRetry(budget_s=0.3, initial_s=0.02, max_s=0.05)
    fn = Script(*[StorageUnavailable(f"down {i}") for i in range(1000)])
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable):
        with_storage_retry(fn, policy=policy, what="x")
    assert 0.3 <= time.monotonic() - t0 < 3 and 4 <= fn.calls < 40  # backoff, not a busy loop
    stop = threading.Event()
    fn = Script(StorageUnavailable("down"), b"never")
    stop.set()
    with pytest.raises(StorageRetryStopped):
        with_storage_retry(fn, policy=FAST, what="x", should_stop=stop.is_set)
    with pytest.raises(ValueError):
        StorageRetry(budget_s=1, initial_s=0)


# --------------------------------------------------------------------------- run_job on S3
@pytest.fixture
def s3_ctx(trainer_settings, s3_bucket, s3_proxy):  # noqa: F811 - fixtures
    settings = Settings(**{**trainer_settings.model_dump(), "blob_url": f"s3://{s3_bucket}/pf",
                           "job_storage_retry_s": 60.0})
    return WorkerContext(settings=settings)


@pytest.fixture
def s3_submit(s3_ctx, session_factory, tenants, tiny_checkpoint, jsonl):
    tok = load_tokenizer(tiny_checkpoint)

    def submit():
        with session_scope(session_factory) as s:
            ds = create_dataset(s, storage=s3_ctx.storage(), tenant_id=tenants[0], data=jsonl(12), tokenizer=tok,
                                limits=DatasetLimits())
            req = JobRequest(adapter_name="ad", dataset_id=ds.id, max_steps=3, batch_size=4, num_virtual_tokens=4,
                             seed=5, learning_rate=3e-2)
            return submit_job(s, tenant_id=tenants[0], request=req, enqueue=lambda _id: None, max_active_jobs=10)
    return submit


def _job(session_factory, tenant_id, job_id):
    with session_scope(session_factory) as s:
        return get_job(s, tenant_id=tenant_id, job_id=job_id)


def _run_in_thread(ctx, job_id) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(run_job(ctx, job_id, task_id="t", worker="w1")), daemon=True)
    thread.start()
    return thread, out


def _served(ctx, session_factory, tenant_id) -> list[int]:
    with session_scope(session_factory) as s:
        versions = list_versions(s, tenant_id=tenant_id, name="ad")
        for v in versions:  # the blob is in the bucket and loads
            assert load_adapter_weights(storage=ctx.storage(), version=v).num_virtual_tokens == 4
        return [v.version for v in versions]


def test_dataset_read_waits_for_the_store_then_the_job_succeeds(s3_ctx, s3_submit, s3_proxy,  # noqa: F811
                                                                 session_factory, tenants, caplog):
    job = s3_submit()
    s3_proxy.down()
    caplog.set_level(logging.WARNING, logger="promptfleet.trainer.storage_retry")
    thread, out = _run_in_thread(s3_ctx, job.id)
    wait_for(lambda: "blob storage unavailable (try 2)" in caplog.text, timeout=60, what="a second read try")
    first_beat = _job(session_factory, tenants[0], job.id).heartbeat_at
    wait_for(lambda: _job(session_factory, tenants[0], job.id).heartbeat_at > first_beat, timeout=10,
             what="a heartbeat while waiting")  # the job is alive, not taken for dead
    running = _job(session_factory, tenants[0], job.id)
    assert thread.is_alive() and running.status == "running" and running.step == 0
    s3_proxy.up()
    thread.join(timeout=120)
    assert not thread.is_alive() and out["status"] == "succeeded", out
    done = _job(session_factory, tenants[0], job.id)
    assert (done.status, done.adapter, done.attempts, done.error) == ("succeeded", "ad@1", 1, None)
    assert _served(s3_ctx, session_factory, tenants[0]) == [1]


def test_adapter_write_waits_for_the_store_then_registers_once(s3_ctx, s3_submit, s3_proxy,  # noqa: F811
                                                              session_factory, tenants, caplog, monkeypatch):
    real_train = runner.train_dataset

    def train_then_lose_the_store(*args, **kwargs):  # the real training; the store goes away as it ends
        result = real_train(*args, **kwargs)
        s3_proxy.down()
        return result

    monkeypatch.setattr(runner, "train_dataset", train_then_lose_the_store)
    job = s3_submit()
    caplog.set_level(logging.WARNING, logger="promptfleet.trainer.storage_retry")
    thread, out = _run_in_thread(s3_ctx, job.id)
    wait_for(lambda: "blob storage unavailable (try 2)" in caplog.text, timeout=120, what="a second write try")
    waiting = _job(session_factory, tenants[0], job.id)
    assert thread.is_alive() and waiting.status == "running" and waiting.step == waiting.total_steps == 3
    assert _served(s3_ctx, session_factory, tenants[0]) == []  # nothing half-registered
    s3_proxy.up()
    thread.join(timeout=120)
    assert not thread.is_alive() and out["status"] == "succeeded", out
    done = _job(session_factory, tenants[0], job.id)
    assert (done.status, done.adapter, done.attempts) == ("succeeded", "ad@1", 1)
    assert _served(s3_ctx, session_factory, tenants[0]) == [1]


def test_outage_past_the_budget_fails_the_job_and_says_why(s3_ctx, s3_submit, s3_proxy, session_factory,  # noqa: F811
                                                           tenants):
    s3_ctx.settings = Settings(**{**s3_ctx.settings.model_dump(), "job_storage_retry_s": 1.0})
    job = s3_submit()
    s3_proxy.down()
    out = run_job(s3_ctx, job.id, task_id="t", worker="w1")
    assert out["status"] == "failed"
    done = _job(session_factory, tenants[0], job.id)
    assert done.status == "failed" and "could not be read from blob storage" in done.error
    assert "unavailable" in done.error and done.adapter is None
    s3_proxy.up()
    assert _served(s3_ctx, session_factory, tenants[0]) == []

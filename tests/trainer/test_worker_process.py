"""Real Celery worker processes (``python -m promptfleet.trainer.worker_main``) against
Redis db 15 and a PostgreSQL database: success with progress, failure, cancel of a running
job, and SIGKILL of a worker mid-job.

Semantics under SIGKILL (documented in ``promptfleet.trainer.celery_app``): the job's
heartbeat stops; any worker's reaper re-queues it once it is older than
``job_stale_after_s`` (up to 3 attempts, then "worker lost"); the next attempt trains from
scratch and registers exactly one adapter version.
"""
from __future__ import annotations

import io

import pytest

from promptfleet.adapters.service import list_versions
from promptfleet.db import session_scope
from promptfleet.platform.tokenizer import load_tokenizer
from promptfleet.settings import Settings
from promptfleet.testing import wait_for
from promptfleet.trainer.celery_app import QUEUE, make_celery, make_enqueue
from promptfleet.trainer.datasets import DatasetLimits
from promptfleet.trainer.schemas import JobRequest
from promptfleet.trainer.service import cancel_job, create_dataset, get_job, submit_job
from promptfleet.trainer.watch import watch_job

pytestmark = [pytest.mark.redis, pytest.mark.postgres, pytest.mark.slow,
              pytest.mark.parametrize("empty_db_url", ["postgres"], indirect=True)]


@pytest.fixture
def api(trainer_settings, redis_url, session_factory, storage, tenants, tiny_checkpoint, jsonl):
    """What the HTTP layer would do: create datasets, submit jobs through Redis, read and cancel them."""
    settings = Settings(**{**trainer_settings.model_dump(), "broker_url": redis_url})
    app = make_celery(settings)
    enqueue = make_enqueue(app)
    tok = load_tokenizer(tiny_checkpoint)
    tenant = tenants[0]

    class Api:
        def dataset(self, n: int = 8) -> tuple[str, str]:
            with session_scope(session_factory) as s:
                ds = create_dataset(s, storage=storage, tenant_id=tenant, data=jsonl(n), tokenizer=tok,
                                    limits=DatasetLimits())
                return ds.id, ds.sha256

        def submit(self, dataset_id: str | None = None, **request) -> str:
            dataset_id = dataset_id or self.dataset()[0]
            with session_scope(session_factory) as s:
                req = JobRequest(**{"dataset_id": dataset_id, "batch_size": 4, "num_virtual_tokens": 4, **request})
                return submit_job(s, tenant_id=tenant, request=req, enqueue=enqueue, max_active_jobs=5).id

        def job(self, job_id: str) -> dict:
            with session_scope(session_factory) as s:
                return get_job(s, tenant_id=tenant, job_id=job_id).to_dict()

        def cancel(self, job_id: str) -> dict:
            with session_scope(session_factory) as s:
                return cancel_job(s, tenant_id=tenant, job_id=job_id).to_dict()

        def versions(self, name: str) -> list[int]:
            with session_scope(session_factory) as s:
                return [v.version for v in list_versions(s, tenant_id=tenant, name=name)]

    yield Api()
    app.close()


def test_submit_progress_success_failure_and_cancel(api, worker_factory, storage):
    worker = worker_factory("w1")
    logs = worker.log
    # 1. success, followed with the CLI's progress bar
    job_id = api.submit(adapter_name="good", max_steps=6)
    out = io.StringIO()
    final = watch_job(lambda: api.job(job_id), interval=0.2, out=out, timeout=90)
    assert final["status"] == "succeeded", (final, logs())
    assert final["adapter"] == "good@1" and final["progress"] == 1.0 and final["step"] == final["total_steps"] == 6
    assert len(final["metrics"]["loss"]) == 6 and final["metrics"]["final_loss"] > 0
    assert "6/6" in out.getvalue() and "succeeded" in out.getvalue()
    assert api.versions("good") == [1]
    # 2. the dataset's blob is gone when the job runs: failed, with the reason
    dataset_id, sha = api.dataset()
    storage.delete(sha)
    job_id = api.submit(dataset_id=dataset_id, adapter_name="broken", max_steps=2)
    failed = wait_for(lambda: (j := api.job(job_id))["status"] in ("succeeded", "failed") and j, timeout=30,
                      what="the broken job to fail", on_timeout=logs)
    assert failed["status"] == "failed" and "could not be read from blob storage" in failed["error"], failed
    assert api.versions("broken") == []
    # 3. a long job: progress advances while running, then cancel stops it without an adapter
    job_id = api.submit(adapter_name="long", epochs=1000, max_steps=100_000)
    first = wait_for(lambda: (j := api.job(job_id))["status"] == "running" and j["step"] >= 2 and j, timeout=60,
                     what="the long job to run", on_timeout=logs)
    wait_for(lambda: api.job(job_id)["step"] > first["step"], timeout=20, what="progress", on_timeout=logs)
    assert 0 < api.job(job_id)["progress"] < 1 and api.job(job_id)["total_steps"] == 2000  # 1000 epochs x 2 batches
    assert api.cancel(job_id)["status"] == "running"  # requested; the worker stops it
    stopped = wait_for(lambda: (j := api.job(job_id))["status"] != "running" and j, timeout=10,
                       what="the cancel to take effect", on_timeout=logs)
    assert stopped["status"] == "cancelled" and stopped["adapter"] is None, stopped
    assert api.versions("long") == []
    # 4. SIGTERM (warm shutdown) mid-job: the job is interrupted and handed back to the queue
    job_id = api.submit(adapter_name="handback", epochs=1000, max_steps=100_000)
    wait_for(lambda: (j := api.job(job_id))["status"] == "running" and j["step"] >= 1, timeout=30,
             what="the hand-back job to run", on_timeout=logs)
    worker.stop(timeout=20)
    assert worker.proc.returncode is not None
    handed_back = api.job(job_id)
    assert handed_back["status"] == "queued" and "worker shutdown" in handed_back["error"], (handed_back, logs())


def test_sigkill_mid_job_then_a_new_worker_finishes_it_exactly_once(api, worker_factory, trainer_settings):
    first = worker_factory("w1")
    job_id = api.submit(adapter_name="survivor", epochs=1000, max_steps=100)
    running = wait_for(lambda: (j := api.job(job_id))["status"] == "running" and j["step"] >= 1 and j, timeout=60,
                       what="the job to run on w1", on_timeout=first.log)
    assert running["worker"] == "w1@test"
    first.kill()
    assert api.job(job_id)["status"] == "running"  # nobody said otherwise: only the heartbeat stopped
    second = worker_factory("w2")
    done = wait_for(lambda: (j := api.job(job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
                    timeout=120, what="w2 to finish the job", on_timeout=lambda: second.log())
    assert done["status"] == "succeeded", (done, second.log())
    assert done["attempts"] == 2 and done["worker"] == "w2@test" and done["adapter"] == "survivor@1"
    assert done["step"] == done["total_steps"] == 100 and done["error"] is None
    assert api.versions("survivor") == [1]
    assert "reaped training job" in second.log()


def test_a_job_whose_broker_message_was_lost_still_runs(api, worker_factory, redis_url):
    """This Redis keeps nothing on disk, so a restart loses every queued message. Submit
    with no worker up, drop the queue in Redis (what the restart does), then start a
    worker: its reaper finds the job still queued past ``job_resend_after_s`` and sends
    the message again."""
    import redis

    job_id = api.submit(adapter_name="resent", max_steps=2)
    client = redis.Redis.from_url(redis_url)
    assert client.delete(QUEUE) == 1  # the job's message, gone
    worker = worker_factory("w1", PROMPTFLEET_JOB_RESEND_AFTER_S="1")
    done = wait_for(lambda: (j := api.job(job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
                    timeout=120, what="the re-sent job to finish", on_timeout=worker.log)
    assert done["status"] == "succeeded" and done["attempts"] == 1, (done, worker.log())
    assert "sent it again" in worker.log()

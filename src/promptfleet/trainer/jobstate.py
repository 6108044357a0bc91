"""A worker's side of the job state machine: claim, heartbeat, finish.

Every write is fenced by ``attempts``: a worker claims a job by bumping ``attempts`` and
only writes while ``status='running' AND attempts=<its attempt>``. If a reaper re-queued
the job, or another worker took it over, the old worker's writes match no row and it
stops. That, plus ``register_adapter``'s idempotency on ``source_job_id``, is why a
redelivered or retried job never registers two adapters.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from promptfleet.db import utcnow
from promptfleet.trainer.models import FINISHED_STATUSES, TrainingJob


@dataclass(frozen=True)
class Claim:
    job_id: str
    tenant_id: str
    adapter_name: str
    dataset_id: str
    method: str
    params: dict[str, Any]
    attempt: int


def _job_filter(job_id: str, attempt: int) -> tuple:
    return (TrainingJob.id == job_id, TrainingJob.status == "running", TrainingJob.attempts == attempt)


def claim_job(session: Session, *, job_id: str, worker: str, task_id: str | None, stale_after_s: float,
              max_attempts: int) -> tuple[Claim | None, str]:
    """Take a queued job (or a running one whose worker went silent). ``(None, why)`` when
    the message must be dropped: unknown, finished, or alive on another worker."""
    job = session.get(TrainingJob, job_id, populate_existing=True)
    if job is None:
        return None, "no such job"
    if job.status in FINISHED_STATUSES:
        return None, f"already {job.status}"
    now = utcnow()
    cutoff = now - timedelta(seconds=stale_after_s)
    if job.status == "running" and job.heartbeat_at is not None and job.heartbeat_at >= cutoff:
        return None, f"running on {job.worker}"
    if job.attempts >= max_attempts:
        fail = session.execute(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.attempts == job.attempts,
                                                         TrainingJob.status.in_(("queued", "running")))
                               .values(status="failed", finished_at=now,
                                       error=f"gave up after {job.attempts} attempts (workers lost)"))
        session.commit()
        return None, "too many attempts" if fail.rowcount else "changed concurrently"
    claimable = or_(TrainingJob.status == "queued",
                    (TrainingJob.status == "running") & (TrainingJob.heartbeat_at < cutoff))
    result = session.execute(
        update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.attempts == job.attempts, claimable)
        .values(status="running", attempts=TrainingJob.attempts + 1, heartbeat_at=now, worker=worker[:255],
                celery_task_id=task_id, started_at=func.coalesce(TrainingJob.started_at, now),
                step=0, progress=0.0, error=None))
    session.commit()
    if not result.rowcount:
        return None, "claimed concurrently"
    session.refresh(job)
    return Claim(job_id=job.id, tenant_id=job.tenant_id, adapter_name=job.adapter_name, dataset_id=job.dataset_id,
                 method=job.method, params=dict(job.params or {}), attempt=job.attempts), "claimed"


def heartbeat(session: Session, *, job_id: str, attempt: int, step: int, total_steps: int | None,
              metrics: dict[str, Any] | None) -> str:
    """Record liveness and progress. Returns ``"ok"``, ``"cancel"`` (cancel requested) or
    ``"lost"`` (the job is no longer this attempt's)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow(), "step": step}
    if total_steps:
        values["total_steps"] = total_steps
        values["progress"] = min(1.0, step / total_steps)
    if metrics is not None:
        values["metrics"] = metrics
    if not session.execute(update(TrainingJob).where(*_job_filter(job_id, attempt)).values(**values)).rowcount:
        session.commit()
        return "lost"
    cancel = session.scalar(select(TrainingJob.cancel_requested).where(TrainingJob.id == job_id))
    session.commit()
    return "cancel" if cancel else "ok"


def lock_for_finish(session: Session, *, job_id: str, attempt: int) -> str:
    """First statement of the finishing transaction: takes the job row's write lock and says
    whether to register (``"ok"``), stop for a cancel (``"cancel"``) or stop (``"lost"``)."""
    row = session.execute(update(TrainingJob).where(*_job_filter(job_id, attempt))
                          .values(heartbeat_at=utcnow())
                          .returning(TrainingJob.cancel_requested)).first()
    if row is None:
        return "lost"
    return "cancel" if row[0] else "ok"


def finish(session: Session, *, job_id: str, attempt: int, status: str, error: str | None = None,
           metrics: dict[str, Any] | None = None, adapter_version: int | None = None,
           adapter: str | None = None, steps: int | None = None) -> bool:
    """Move this attempt's running job to a final state (no commit). False if it is not ours."""
    if status not in FINISHED_STATUSES:
        raise ValueError(f"not a final status: {status!r}")
    values: dict[str, Any] = {"status": status, "error": error, "finished_at": utcnow(), "heartbeat_at": utcnow()}
    if status == "succeeded":
        values.update(progress=1.0, adapter_version=adapter_version, adapter=adapter)
        if steps is not None:
            values.update(step=steps, total_steps=steps)
    if metrics is not None:
        values["metrics"] = metrics
    return bool(session.execute(update(TrainingJob).where(*_job_filter(job_id, attempt)).values(**values)).rowcount)


def release(session: Session, *, job_id: str, attempt: int, reason: str) -> bool:
    """Give a running job back to the queue (the worker is shutting down); no commit."""
    return bool(session.execute(update(TrainingJob).where(*_job_filter(job_id, attempt))
                                .values(status="queued", worker=None, heartbeat_at=None, step=0, progress=0.0,
                                        error=reason)).rowcount)

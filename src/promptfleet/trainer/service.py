"""Trainer service: datasets and training jobs, per tenant.

Keyword-only functions taking a ``Session`` first; no HTTP. Functions that write commit
(a worker in another process must see a job before its message arrives). Another
tenant's dataset or job answers ``NotFound``, exactly like a missing one.

Job states: queued -> running -> succeeded | failed | cancelled (queued -> cancelled
directly). Every transition is a conditional UPDATE, so concurrent cancels, workers and
reapers never overwrite each other's outcome.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from promptfleet.db import utcnow
from promptfleet.paging import Page, SortKey, UnknownCursor, fetch_page
from promptfleet.trainer.datasets import DatasetLimits, parse_dataset
from promptfleet.trainer.models import ACTIVE_STATUSES, Dataset, TrainingJob
from promptfleet.tenants.service import lock_tenant
from promptfleet.trainer.schemas import JobRequest

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 3


class BlobStore(Protocol):
    def put(self, data: bytes) -> str: ...
    def get(self, sha256: str) -> bytes: ...


class TrainerError(Exception):
    """Base class of the trainer's refusals."""


class NotFound(TrainerError, LookupError):
    """No such dataset or job for this tenant."""


class TooManyJobs(TrainerError):
    """The tenant already has its limit of queued + running jobs."""


class DatasetTooLarge(TrainerError):
    """The uploaded dataset exceeds the size limit."""


class JobNotCancellable(TrainerError):
    """The job already succeeded or failed."""


class EnqueueError(TrainerError):
    """The broker refused the job; the job is marked failed."""


class TrainingBudgetExceeded(TrainerError):
    """The job would train more example-passes than the per-job or per-tenant daily budget."""


@dataclass(frozen=True)
class TrainingBudget:
    """Example-pass budgets checked at submit (0 = no limit): per job, and per tenant over
    the jobs it created in the last 24 h."""

    per_job: int = 0
    per_tenant_day: int = 0


# --- datasets -------------------------------------------------------------------------

def create_dataset(session: Session, *, storage: BlobStore, tenant_id: str, data: bytes, tokenizer: Any,
                   limits: DatasetLimits) -> Dataset:
    """Validate a JSONL dataset (``DatasetError`` names the bad line), store it, record it."""
    if len(data) > limits.max_bytes:
        raise DatasetTooLarge(f"dataset is {len(data)} bytes, more than the limit of {limits.max_bytes} bytes")
    examples = parse_dataset(data, tokenizer=tokenizer, max_example_tokens=limits.max_example_tokens,
                             max_examples=limits.max_examples, max_line_bytes=limits.max_line_bytes)
    sha = storage.put(data)
    dataset = Dataset(tenant_id=tenant_id, sha256=sha, num_examples=len(examples),
                      num_tokens=sum(e.num_tokens for e in examples), size_bytes=len(data))
    session.add(dataset)
    session.commit()
    return dataset


def get_dataset(session: Session, *, tenant_id: str, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant_id != tenant_id:
        raise NotFound(f"dataset {dataset_id!r} not found")
    return dataset


def list_datasets(session: Session, *, tenant_id: str, limit: int = 100) -> list[Dataset]:
    stmt = (select(Dataset).where(Dataset.tenant_id == tenant_id)
            .order_by(Dataset.created_at.desc(), Dataset.id).limit(limit))
    return list(session.scalars(stmt))


_NEWEST_FIRST = (SortKey(Dataset.created_at, descending=True), SortKey(Dataset.id))
_JOBS_NEWEST_FIRST = (SortKey(TrainingJob.created_at, descending=True), SortKey(TrainingJob.id))


def page_datasets(session: Session, *, tenant_id: str, limit: int, after: str | None = None) -> Page[Dataset]:
    """``limit`` of the tenant's datasets, newest first, after the dataset ``after``
    (``UnknownCursor`` when it is not one of the tenant's)."""
    cursor = None
    if after is not None:
        row = session.execute(select(Dataset.created_at, Dataset.id)
                              .where(Dataset.tenant_id == tenant_id, Dataset.id == after)).first()
        if row is None:
            raise UnknownCursor(f"unknown cursor {after!r}")
        cursor = tuple(row)
    return fetch_page(session, select(Dataset).where(Dataset.tenant_id == tenant_id), keys=_NEWEST_FIRST,
                      after=cursor, limit=limit)


# --- jobs -----------------------------------------------------------------------------

def count_active_jobs(session: Session, *, tenant_id: str) -> int:
    stmt = select(func.count()).select_from(TrainingJob).where(
        TrainingJob.tenant_id == tenant_id, TrainingJob.status.in_(ACTIVE_STATUSES))
    return int(session.scalar(stmt) or 0)


def example_passes(*, num_examples: int, request: JobRequest) -> tuple[int, str]:
    """How many examples a job feeds through the model (one per example per epoch, or as
    many as its ``max_steps`` batches hold when that ends it sooner), and that sum in words."""
    per_epoch = math.ceil(num_examples / request.batch_size)
    if not request.max_steps or request.max_steps >= request.epochs * per_epoch:
        passes = request.epochs * num_examples
        return passes, f"{request.epochs:,} epochs x {num_examples:,} examples = {passes:,} example-passes"
    full_epochs, rest = divmod(request.max_steps, per_epoch)
    passes = full_epochs * num_examples + min(rest * request.batch_size, num_examples)
    return passes, (f"{request.max_steps:,} steps (max_steps) of batch_size {request.batch_size:,} "
                    f"over {num_examples:,} examples = {passes:,} example-passes")


def example_passes_last_day(session: Session, *, tenant_id: str) -> int:
    """Example-passes of the tenant's jobs created in the last 24 h, except those cancelled
    or failed before they started (they trained nothing)."""
    never_ran = TrainingJob.status.in_(("cancelled", "failed")) & TrainingJob.started_at.is_(None)
    stmt = select(func.coalesce(func.sum(TrainingJob.example_passes), 0)).where(
        TrainingJob.tenant_id == tenant_id, TrainingJob.created_at >= utcnow() - timedelta(days=1), ~never_ran)
    return int(session.scalar(stmt) or 0)


def check_training_budget(session: Session, *, tenant_id: str, passes: int, described: str,
                          budget: TrainingBudget) -> None:
    """``TrainingBudgetExceeded`` (naming the numbers and the setting) when ``passes`` is over
    a budget. Call with the tenant locked, so two submissions cannot both fit the last room."""
    if budget.per_job and passes > budget.per_job:
        raise TrainingBudgetExceeded(f"this job would train {described}, over the per-job budget of "
                                     f"{budget.per_job:,} (PROMPTFLEET_JOB_MAX_TRAIN_EXAMPLES)")
    if budget.per_tenant_day:
        used = example_passes_last_day(session, tenant_id=tenant_id)
        if used + passes > budget.per_tenant_day:
            raise TrainingBudgetExceeded(
                f"this job would train {described}; with the {used:,} of this tenant's jobs from the last 24 h "
                f"that makes {used + passes:,}, over the per-tenant daily budget of {budget.per_tenant_day:,} "
                "(PROMPTFLEET_TENANT_TRAIN_EXAMPLES_PER_DAY)")


def submit_job(session: Session, *, tenant_id: str, request: JobRequest, enqueue: Callable[[str], str | None],
               max_active_jobs: int = 2, budget: TrainingBudget = TrainingBudget()) -> TrainingJob:
    """Record a queued job, commit, then ``enqueue(job_id)`` (returns the Celery task id).

    ``NotFound`` when the dataset (or the validation dataset) is not the tenant's; ``TooManyJobs`` at the limit of
    queued + running jobs; ``TrainingBudgetExceeded`` over an example-pass budget;
    ``EnqueueError`` (job marked failed) when the broker refuses.
    """
    if not lock_tenant(session, tenant_id=tenant_id):  # one submission of a tenant at a time
        raise NotFound(f"tenant {tenant_id!r} not found")
    dataset = get_dataset(session, tenant_id=tenant_id, dataset_id=request.dataset_id)
    if request.validation_dataset_id is not None:
        get_dataset(session, tenant_id=tenant_id, dataset_id=request.validation_dataset_id)
    active = count_active_jobs(session, tenant_id=tenant_id)
    if active >= max_active_jobs:
        raise TooManyJobs(f"tenant has {active} queued or running jobs (limit {max_active_jobs}); "
                          "wait for one to finish or cancel one")
    passes, described = example_passes(num_examples=dataset.num_examples, request=request)
    check_training_budget(session, tenant_id=tenant_id, passes=passes, described=described, budget=budget)
    job = TrainingJob(tenant_id=tenant_id, adapter_name=request.adapter_name, dataset_id=request.dataset_id,
                      method=request.method, params=request.params(), status="queued", metrics={},
                      enqueued_at=utcnow(), example_passes=passes)
    session.add(job)
    session.commit()
    try:
        task_id = enqueue(job.id)
    except Exception as exc:
        log.exception("could not enqueue training job %s", job.id)
        session.execute(update(TrainingJob).where(TrainingJob.id == job.id, TrainingJob.status == "queued")
                        .values(status="failed", error=f"could not enqueue the job: {exc}", finished_at=utcnow()))
        session.commit()
        raise EnqueueError(f"could not enqueue the job: {exc}") from exc
    if task_id:
        session.execute(update(TrainingJob).where(TrainingJob.id == job.id, TrainingJob.celery_task_id.is_(None))
                        .values(celery_task_id=str(task_id)))
        session.commit()
    session.refresh(job)
    return job


def get_job(session: Session, *, tenant_id: str, job_id: str) -> TrainingJob:
    job = session.get(TrainingJob, job_id, populate_existing=True)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"job {job_id!r} not found")
    return job


def list_jobs(session: Session, *, tenant_id: str, status: str | None = None, limit: int = 100) -> list[TrainingJob]:
    stmt = select(TrainingJob).where(TrainingJob.tenant_id == tenant_id)
    if status is not None:
        stmt = stmt.where(TrainingJob.status == status)
    stmt = stmt.order_by(TrainingJob.created_at.desc(), TrainingJob.id).limit(limit)
    return list(session.scalars(stmt))


def page_jobs(session: Session, *, tenant_id: str, limit: int, after: str | None = None,
              status: str | None = None) -> Page[TrainingJob]:
    """``limit`` of the tenant's jobs (of ``status`` when given), newest first, after the job
    ``after`` (``UnknownCursor`` when it is not one of the tenant's; its status may differ)."""
    cursor = None
    if after is not None:
        row = session.execute(select(TrainingJob.created_at, TrainingJob.id)
                              .where(TrainingJob.tenant_id == tenant_id, TrainingJob.id == after)).first()
        if row is None:
            raise UnknownCursor(f"unknown cursor {after!r}")
        cursor = tuple(row)
    stmt = select(TrainingJob).where(TrainingJob.tenant_id == tenant_id)
    if status is not None:
        stmt = stmt.where(TrainingJob.status == status)
    return fetch_page(session, stmt, keys=_JOBS_NEWEST_FIRST, after=cursor, limit=limit)


def cancel_job(session: Session, *, tenant_id: str, job_id: str) -> TrainingJob:
    """Queued -> cancelled at once; running -> ``cancel_requested`` (the worker stops within
    about a heartbeat and marks it cancelled, registering nothing). Cancelling a cancelled
    job is a no-op; a succeeded or failed one raises ``JobNotCancellable``."""
    get_job(session, tenant_id=tenant_id, job_id=job_id)
    now = utcnow()
    done = session.execute(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.status == "queued")
                           .values(status="cancelled", cancel_requested=True, finished_at=now,
                                   error="cancelled before it started")).rowcount
    if not done:
        session.execute(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.status == "running")
                        .values(cancel_requested=True))
    session.commit()
    job = get_job(session, tenant_id=tenant_id, job_id=job_id)
    if job.status in ("succeeded", "failed"):
        raise JobNotCancellable(f"job {job_id} already {job.status}")
    return job


def _record_task_id(session: Session, job_id: str, task_id: str | None) -> None:
    """The Celery task id of the message just sent again for ``job_id`` (replaces the old one)."""
    if task_id:
        session.execute(update(TrainingJob).where(TrainingJob.id == job_id).values(celery_task_id=str(task_id)))
        session.commit()


def reap_stale_jobs(session: Session, *, stale_after_s: float, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                    enqueue: Callable[[str], str | None] | None = None) -> list[TrainingJob]:
    """Running jobs whose worker stopped heartbeating (killed, lost its machine).

    With ``enqueue`` and fewer than ``max_attempts`` attempts: back to queued and enqueued
    again (the next attempt trains from scratch with the same seed). Otherwise: failed with
    "worker lost". A job whose cancel was requested becomes cancelled. Returns the jobs changed.
    """
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    stale_cond = (TrainingJob.status == "running", TrainingJob.heartbeat_at < cutoff)
    candidates = list(session.scalars(select(TrainingJob).where(*stale_cond)))
    changed: list[TrainingJob] = []
    requeued: list[str] = []
    for job in candidates:
        fenced = (TrainingJob.id == job.id, *stale_cond, TrainingJob.attempts == job.attempts)
        silence = f"no heartbeat from worker {job.worker or '?'} for more than {stale_after_s:g} s"
        now = utcnow()
        if job.cancel_requested:
            values: dict[str, Any] = {"status": "cancelled", "finished_at": now,
                                      "error": f"cancelled (worker lost: {silence})"}
        elif enqueue is not None and job.attempts < max_attempts:
            values = {"status": "queued", "worker": None, "heartbeat_at": None, "progress": 0.0, "step": 0,
                      "enqueued_at": now, "error": f"attempt {job.attempts} interrupted ({silence}); re-queued"}
        else:
            values = {"status": "failed", "finished_at": now,
                      "error": f"worker lost: {silence} (attempt {job.attempts} of {max_attempts}); not retried"}
        if session.execute(update(TrainingJob).where(*fenced).values(**values)).rowcount:
            changed.append(job)
            if values["status"] == "queued":
                requeued.append(job.id)
            log.warning("reaped training job %s: %s", job.id, values["error"])
    session.commit()
    for job_id in requeued:
        try:
            task_id = enqueue(job_id) if enqueue is not None else None
        except Exception as exc:  # the broker is down: leave it failed rather than queued forever
            log.exception("could not re-enqueue job %s", job_id)
            session.execute(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.status == "queued")
                            .values(status="failed", finished_at=utcnow(), error=f"could not re-enqueue: {exc}"))
            session.commit()
            continue
        _record_task_id(session, job_id, task_id)
    for job in changed:
        session.refresh(job)
    return changed


def resend_queued_jobs(session: Session, *, older_than_s: float,
                       enqueue: Callable[[str], str | None]) -> list[str]:
    """Send the broker message again for jobs still queued ``older_than_s`` after it was
    last sent: a broker that keeps nothing on disk loses its messages when it restarts,
    and an accepted job must not stay queued forever. A message that was only slow
    arrives as a duplicate, which ``claim_job`` drops. Each resend is claimed with a
    conditional update, so two reapers never both send. Returns the ids sent again; a
    broker that is down now leaves them queued for the next round."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    due = session.execute(select(TrainingJob.id, TrainingJob.enqueued_at).where(
        TrainingJob.status == "queued", or_(TrainingJob.enqueued_at < cutoff, TrainingJob.enqueued_at.is_(None)))).all()
    sent: list[str] = []
    for job_id, last in due:
        last_cond = TrainingJob.enqueued_at.is_(None) if last is None else TrainingJob.enqueued_at == last
        claimed = session.execute(update(TrainingJob).where(TrainingJob.id == job_id, TrainingJob.status == "queued",
                                                            last_cond).values(enqueued_at=utcnow())).rowcount
        session.commit()
        if not claimed:
            continue
        try:
            task_id = enqueue(job_id)
        except Exception:
            log.warning("could not re-send queued job %s; will try again", job_id, exc_info=True)
            continue
        log.warning("training job %s was still queued %g s after its message was sent; sent it again",
                    job_id, older_than_s)
        sent.append(job_id)
        _record_task_id(session, job_id, task_id)
    return sent

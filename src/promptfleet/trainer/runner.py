"""Running one training job inside a worker: claim, heartbeat, train, register, finish.

``run_job`` is what the Celery task calls; it never raises for a job's own failure (the
job is marked failed with the message), so the broker message is acknowledged and never
redelivered for an error that would only repeat. Blob storage that cannot be reached
while the job reads its dataset or writes its adapter is waited for (``storage_retry``),
within ``job_storage_retry_s``, so an outage of the store does not lose an accepted job.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from promptfleet.adapters.storage import StorageUnavailable
from promptfleet.db import make_engine, make_session_factory
from promptfleet.settings import Settings
from promptfleet.trainer import jobstate
from promptfleet.trainer.isolated import Isolation, TrainingFailed, train_in_child
from promptfleet.trainer.jobstate import Claim
from promptfleet.trainer.models import Dataset
from promptfleet.trainer.service import DEFAULT_MAX_ATTEMPTS
from promptfleet.trainer.storage_retry import StorageRetry, StorageRetryStopped, with_storage_retry
from promptfleet.trainer.train import (TrainConfig, TrainingCancelled, TrainResult, WallClock, WallClockExceeded,
                                       _downsample, train_dataset)

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a worker needs to run jobs, built lazily from ``Settings`` (one per Celery app)."""

    settings: Settings
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    enqueue: Callable[[str], str | None] | None = None
    shutdown: threading.Event = field(default_factory=threading.Event)
    isolation: Isolation | None = None  # set: each job trains in a niced child process (the embedded worker)
    _factory: sessionmaker[Session] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def session_factory(self) -> sessionmaker[Session]:
        with self._lock:
            if self._factory is None:
                self._factory = make_session_factory(make_engine(self.settings.resolved_database_url()))
            return self._factory

    def storage(self) -> Any:
        from promptfleet.adapters.blob_url import open_blob_storage

        return open_blob_storage(self.settings.blob_url, default_root=Path(self.settings.blob_dir))

    def model_path(self) -> str:
        if not self.settings.model:
            raise RuntimeError("no backbone checkpoint configured (set PROMPTFLEET_MODEL)")
        from promptfleet.platform.weights import resolve_checkpoint

        return str(resolve_checkpoint(self.settings.model))

    @property
    def poll_s(self) -> float:
        return max(0.05, min(float(self.settings.job_heartbeat_s), 1.0))

    def storage_retry(self) -> StorageRetry:
        return StorageRetry(budget_s=float(self.settings.job_storage_retry_s))

    def wall_clock(self) -> WallClock | None:
        """A fresh wall-clock limit for an attempt starting now (None when unlimited)."""
        limit = float(self.settings.job_max_wall_s)
        return WallClock(limit) if limit > 0 else None


class JobMonitor:
    """A thread that heartbeats the job with its progress and watches for cancel/takeover."""

    def __init__(self, ctx: WorkerContext, claim: Claim) -> None:
        self._ctx, self._claim = ctx, claim
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"job-monitor-{claim.job_id[:8]}", daemon=True)
        self.state = "ok"  # ok | cancel | lost
        self.step, self.total = 0, None
        self.losses: list[float] = []
        self.epochs: list[dict[str, Any]] = []  # epoch 0: the zero-shot evaluation

    def start(self) -> "JobMonitor":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def progress(self, step: int, total: int, loss: float) -> None:
        with self._lock:
            self.step, self.total = step, total
            self.losses.append(loss)

    def epoch(self, entry: dict[str, Any]) -> None:
        """An epoch's (or the zero-shot) evaluation: published with the next heartbeat."""
        with self._lock:
            self.epochs.append(dict(entry))

    def set_total(self, total: int) -> None:
        """Publish the number of steps before the first one (one immediate heartbeat)."""
        with self._lock:
            self.total = total
        self.beat()

    def should_stop(self) -> bool:
        return self.state != "ok" or self._ctx.shutdown.is_set()

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            losses, epochs = list(self.losses), [dict(e) for e in self.epochs]
        out: dict[str, Any] = {"loss": _downsample(losses), "initial_loss": losses[0]} if losses else {}
        if epochs and epochs[0].get("epoch") == 0:
            zero = epochs.pop(0)
            zero.pop("epoch")
            out["zero_shot"] = zero
        if epochs:
            out["epochs"] = epochs
        return out

    def beat(self) -> None:
        with self._lock:
            step, total = self.step, self.total
        try:
            with self._ctx.session_factory() as session:
                state = jobstate.heartbeat(session, job_id=self._claim.job_id, attempt=self._claim.attempt,
                                           step=step, total_steps=total, metrics=self.metrics())
        except Exception:  # a database hiccup: keep training; the reaper handles long silences
            log.warning("heartbeat of job %s failed", self._claim.job_id, exc_info=True)
            return
        if state != "ok" and self.state == "ok":
            log.info("job %s: %s", self._claim.job_id, "cancel requested" if state == "cancel" else "taken over")
            self.state = state

    def _run(self) -> None:
        while not self._stop.wait(self._ctx.poll_s):
            self.beat()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_dataset(ctx: WorkerContext, storage: Any, dataset_id: str, sha: str, monitor: JobMonitor) -> bytes:
    """The dataset's bytes; an unreachable store is waited for (a cancel or shutdown meanwhile
    stops the attempt as ``TrainingCancelled`` does)."""
    try:
        return with_storage_retry(lambda: storage.get(sha), policy=ctx.storage_retry(), what=f"dataset {dataset_id}",
                                  should_stop=monitor.should_stop, wake=ctx.shutdown)
    except StorageRetryStopped as exc:
        raise TrainingCancelled(str(exc)) from exc
    except Exception as exc:
        raise RuntimeError(f"dataset {dataset_id} could not be read from blob storage "
                           f"(sha256 {sha[:12]}): {_describe(exc)}") from exc


def _train(ctx: WorkerContext, claim: Claim, monitor: JobMonitor,
           wall_clock: WallClock | None) -> tuple[TrainResult, Any]:
    from promptfleet.platform.weights import read_model_config

    model_path = ctx.model_path()
    model_config = read_model_config(model_path)  # a directory's config.json or a GGUF's metadata
    storage = ctx.storage()
    with ctx.session_factory() as session:
        dataset = session.get(Dataset, claim.dataset_id)
        if dataset is None:
            raise LookupError(f"dataset {claim.dataset_id} no longer exists")
        sha = dataset.sha256
    data = _read_dataset(ctx, storage, claim.dataset_id, sha, monitor)
    p = claim.params
    validation_data = None
    if p.get("validation_dataset_id"):
        with ctx.session_factory() as session:
            validation = session.get(Dataset, p["validation_dataset_id"])
            if validation is None:
                raise LookupError(f"validation dataset {p['validation_dataset_id']} no longer exists")
            validation_sha = validation.sha256
        validation_data = _read_dataset(ctx, storage, p["validation_dataset_id"], validation_sha, monitor)
    nvt = int(p.get("num_virtual_tokens", 8))
    room = model_config.n_positions - nvt
    if room < 2:
        raise ValueError(f"num_virtual_tokens={nvt} leaves no room in the backbone's "
                         f"{model_config.n_positions} positions")
    lr, patience = p.get("learning_rate"), p.get("early_stopping_patience")
    fraction = p.get("validation_fraction")
    cfg = TrainConfig(model_path=model_path, method=claim.method, num_virtual_tokens=nvt,  # type: ignore[arg-type]
                      epochs=int(p.get("epochs", 1)), learning_rate=None if lr is None else float(lr),
                      batch_size=int(p.get("batch_size", 8)), max_steps=p.get("max_steps"),
                      seed=int(p.get("seed", 0)), init=p.get("init") or "random_vocab",
                      init_text=p.get("init_text"), device=ctx.settings.device,
                      validation_fraction=None if fraction is None else float(fraction),
                      early_stopping_patience=None if patience is None else int(patience),
                      tune_decoding=bool(p.get("tune_decoding", True)),
                      decoding_budget=int(ctx.settings.job_decoding_search_budget))
    hooks = dict(on_total=monitor.set_total, progress=monitor.progress, on_epoch=monitor.epoch,
                 should_cancel=monitor.should_stop, wall_clock=wall_clock)
    if ctx.isolation is not None:
        result = train_in_child(cfg, data, max_example_tokens=room, isolation=ctx.isolation,
                                validation_data=validation_data, **hooks)
    else:
        result = train_dataset(cfg, data, max_example_tokens=room, validation_data=validation_data, **hooks)
    return result, model_config


def _register(ctx: WorkerContext, claim: Claim, result: TrainResult, model_config: Any,
              monitor: JobMonitor) -> dict[str, Any]:
    """Register the trained adapter; while blob storage is unreachable, heartbeat and try
    again (each try is its own transaction: no row lock is held while waiting)."""
    try:
        return with_storage_retry(lambda: _register_once(ctx, claim, result, model_config), policy=ctx.storage_retry(),
                                  what=f"the adapter of job {claim.job_id}", should_stop=monitor.should_stop,
                                  between=monitor.beat, wake=ctx.shutdown)
    except StorageRetryStopped:
        return _stopped(ctx, claim, monitor)
    except StorageUnavailable as exc:
        return _fail(ctx, claim, f"could not register the adapter: {_describe(exc)}", result.metrics)


def _register_once(ctx: WorkerContext, claim: Claim, result: TrainResult, model_config: Any) -> dict[str, Any]:
    from promptfleet.adapters.service import register_adapter

    job_id, attempt = claim.job_id, claim.attempt
    with ctx.session_factory() as session:
        state = jobstate.lock_for_finish(session, job_id=job_id, attempt=attempt)
        if state == "lost":
            session.rollback()
            return {"job_id": job_id, "status": "lost"}
        if state == "cancel":
            jobstate.finish(session, job_id=job_id, attempt=attempt, status="cancelled",
                            error="cancelled after training, before registration", metrics=result.metrics)
            session.commit()
            return {"job_id": job_id, "status": "cancelled"}
        try:
            version = register_adapter(session, storage=ctx.storage(), tenant_id=claim.tenant_id,
                                       name=claim.adapter_name, config=result.adapter_config,
                                       safetensors_bytes=result.safetensors_bytes, model_config=model_config,
                                       source_job_id=job_id,
                                       generation_defaults=(result.metrics.get("decoding") or {}).get("best"))
            ref = f"{version.name}@{version.version}"
            jobstate.finish(session, job_id=job_id, attempt=attempt, status="succeeded", metrics=result.metrics,
                            adapter_version=version.version, adapter=ref, steps=result.metrics["steps"])
            session.commit()
        except StorageUnavailable:
            session.rollback()
            raise  # _register waits for the store and tries again
        except Exception as exc:
            session.rollback()
            log.exception("registering the adapter of job %s failed", job_id)
            return _fail(ctx, claim, f"could not register the adapter: {_describe(exc)}", result.metrics)
    log.info("job %s succeeded: %s", job_id, ref)
    return {"job_id": job_id, "status": "succeeded", "adapter": ref}


def _fail(ctx: WorkerContext, claim: Claim, message: str, metrics: dict[str, Any] | None) -> dict[str, Any]:
    with ctx.session_factory() as session:
        jobstate.finish(session, job_id=claim.job_id, attempt=claim.attempt, status="failed", error=message,
                        metrics=metrics or None)
        session.commit()
    log.warning("job %s failed: %s", claim.job_id, message)
    return {"job_id": claim.job_id, "status": "failed", "error": message}


def _stopped(ctx: WorkerContext, claim: Claim, monitor: JobMonitor) -> dict[str, Any]:
    job_id, attempt = claim.job_id, claim.attempt
    if monitor.state == "lost":
        return {"job_id": job_id, "status": "lost"}
    with ctx.session_factory() as session:
        if monitor.state == "cancel":
            jobstate.finish(session, job_id=job_id, attempt=attempt, status="cancelled",
                            error=f"cancelled at step {monitor.step}", metrics=monitor.metrics())
            session.commit()
            return {"job_id": job_id, "status": "cancelled"}
        released = jobstate.release(session, job_id=job_id, attempt=attempt,
                                    reason=f"attempt {attempt} interrupted by a worker shutdown; re-queued")
        session.commit()
    if released and ctx.enqueue is not None:
        ctx.enqueue(job_id)
    return {"job_id": job_id, "status": "queued"}


def run_job(ctx: WorkerContext, job_id: str, *, task_id: str | None, worker: str) -> dict[str, Any]:
    """Run one delivery of a job's message. Duplicate deliveries of a job that is finished
    or alive elsewhere are dropped; only one attempt at a time can hold the job."""
    with ctx.session_factory() as session:
        claim, why = jobstate.claim_job(session, job_id=job_id, worker=worker, task_id=task_id,
                                        stale_after_s=ctx.settings.job_stale_after_s, max_attempts=ctx.max_attempts)
    if claim is None:
        log.info("job %s: delivery dropped (%s)", job_id, why)
        return {"job_id": job_id, "status": "skipped", "reason": why}
    log.info("job %s: attempt %d started on %s", job_id, claim.attempt, worker)
    wall_clock = ctx.wall_clock()  # per attempt: a re-queued job starts a fresh clock
    monitor = JobMonitor(ctx, claim).start()
    try:
        result, model_config = _train(ctx, claim, monitor, wall_clock)
    except TrainingCancelled:
        monitor.stop()
        return _stopped(ctx, claim, monitor)
    except (WallClockExceeded, TrainingFailed) as exc:  # their text is the whole story
        monitor.stop()
        return _fail(ctx, claim, str(exc), monitor.metrics())
    except Exception as exc:
        monitor.stop()
        log.exception("job %s: training failed", job_id)
        return _fail(ctx, claim, _describe(exc), monitor.metrics())
    monitor.stop()
    return _register(ctx, claim, result, model_config, monitor)

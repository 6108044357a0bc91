"""The Celery app factory, the enqueue function for the API, and the two ways to run workers.

* Production: Redis (``PROMPTFLEET_BROKER_URL=redis://host:6379/0``) and standalone
  workers (``promptfleet worker`` -> ``run_worker(settings)``), any number of machines.
* Embedded (default): an SQLite broker file in the data dir and one solo-pool worker in
  a thread of the server process (``start_embedded_worker(app)``); about 1 s latency.
  Its jobs train in a niced child process with a capped torch thread count
  (``trainer.isolated``), so training never starves the API and the engine of CPU.

Delivery is at-least-once (``acks_late``); the job row, not the message, decides what
runs (see ``jobstate``). Every worker also runs a ``Reaper`` thread that re-queues jobs
whose worker stopped heartbeating (SIGKILL, lost machine) up to ``max_attempts`` times,
then fails them with "worker lost".
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence

from celery import Celery

from promptfleet.settings import Settings
from promptfleet.trainer.isolated import Isolation, default_train_threads, prestart
from promptfleet.trainer.runner import WorkerContext
from promptfleet.trainer.service import DEFAULT_MAX_ATTEMPTS, reap_stale_jobs, resend_queued_jobs
from promptfleet.trainer.tasks import TASK_NAME, register_tasks

log = logging.getLogger(__name__)

QUEUE = "promptfleet-training"
CONTEXT_KEY = "promptfleet_context"
# A redelivered message of a job that is alive elsewhere is dropped, so this only bounds how
# late Redis hands back the message of a killed worker; the Reaper usually acts first.
VISIBILITY_TIMEOUT_S = 3600


def make_celery(settings: Settings, *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> Celery:
    """A Celery app for ``settings`` with the ``train_adapter`` task registered."""
    broker = settings.resolved_broker_url()
    backend = settings.resolved_result_backend()
    if broker.startswith("sqla+sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery("promptfleet", broker=broker, backend=backend, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    if broker.startswith(("redis", "rediss")):
        # (the SQLAlchemy transport hands its options to create_engine, so only Redis gets them)
        app.conf.broker_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
        app.conf.result_backend_transport_options = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    ctx = WorkerContext(settings=settings, max_attempts=max_attempts)
    ctx.enqueue = make_enqueue(app)
    app.conf[CONTEXT_KEY] = ctx
    register_tasks(app, ctx)
    return app


def worker_context(app: Celery) -> WorkerContext:
    return app.conf[CONTEXT_KEY]


def make_enqueue(app: Celery) -> Callable[[str], str | None]:
    """``enqueue(job_id) -> celery task id``: what ``service.submit_job`` needs."""

    def enqueue(job_id: str) -> str | None:
        return app.send_task(TASK_NAME, args=[job_id], queue=QUEUE).id

    return enqueue


class Reaper:
    """Re-queues (or fails) running jobs whose heartbeat is older than ``job_stale_after_s``,
    and sends again the message of jobs queued longer than ``job_resend_after_s``."""

    def __init__(self, ctx: WorkerContext, *, interval_s: float | None = None) -> None:
        self._ctx = ctx
        self._interval = interval_s or max(0.5, ctx.settings.job_stale_after_s / 2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promptfleet-reaper", daemon=True)

    def start(self) -> "Reaper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def reap_once(self) -> int:
        settings = self._ctx.settings
        with self._ctx.session_factory() as session:
            changed = len(reap_stale_jobs(session, stale_after_s=settings.job_stale_after_s,
                                          max_attempts=self._ctx.max_attempts, enqueue=self._ctx.enqueue))
            if settings.job_resend_after_s > 0:
                changed += len(resend_queued_jobs(session, older_than_s=settings.job_resend_after_s,
                                                  enqueue=self._ctx.enqueue))
            return changed

    def _run(self) -> None:
        while True:
            try:
                self.reap_once()
            except Exception:
                log.warning("reaping stale training jobs failed", exc_info=True)
            if self._stop.wait(self._interval):
                return


def _hostname(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}@{socket.gethostname()}"


def embedded_isolation(settings: Settings) -> Isolation | None:
    """How the embedded worker isolates training from the server (None: in its own thread)."""
    if not settings.embedded_train_subprocess:
        return None
    return Isolation(nice=settings.train_nice, threads=settings.train_threads or default_train_threads())


class EmbeddedWorker:
    """A solo-pool Celery worker in a daemon thread of this process, plus its reaper."""

    def __init__(self, app: Celery, *, hostname: str | None = None, loglevel: str = "INFO") -> None:
        self.app = app
        self.ctx = worker_context(app)
        self.hostname = hostname or _hostname("embedded")
        self._loglevel = loglevel
        self._ready = threading.Event()
        self._worker = None
        self._thread = threading.Thread(target=self._run, name="promptfleet-embedded-worker", daemon=True)
        self._reaper = Reaper(self.ctx)
        self.ctx.isolation = embedded_isolation(self.ctx.settings)
        self.error: BaseException | None = None

    def start(self, *, wait_ready_s: float = 30.0) -> "EmbeddedWorker":
        self.ctx.shutdown.clear()
        if self.ctx.isolation is not None:
            prestart(self.ctx.isolation)
        self._thread.start()
        self._ready.wait(wait_ready_s)
        self._reaper.start()
        return self

    def _run(self) -> None:
        try:
            # The solo pool resolves task names through the *current* app, which is thread-local:
            # make it ours in this thread only (the server's other threads are untouched).
            self.app.set_current()
            self._worker = self.app.WorkController(
                hostname=self.hostname, pool_cls="solo", concurrency=1, queues=[QUEUE], loglevel=self._loglevel,
                without_heartbeat=True, without_mingle=True, without_gossip=True, optimization="fair",
                ready_callback=lambda *_: self._ready.set())
            self._worker.start()
        except BaseException as exc:  # surface it to the owner instead of dying silently
            log.exception("embedded Celery worker stopped with an error")
            self.error = exc
        finally:
            self._ready.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Interrupt the running job (it goes back to the queue) and stop the worker."""
        self.ctx.shutdown.set()
        self._reaper.stop()
        if self._worker is not None:
            self._worker.stop(in_sighandler=False)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("embedded Celery worker did not stop within %.0f s", timeout)


def start_embedded_worker(app: Celery, **kwargs) -> EmbeddedWorker:
    """Start the in-process worker (``promptfleet serve`` does this when ``embedded_worker``)."""
    return EmbeddedWorker(app, **kwargs).start()


def run_worker(settings: Settings, *, loglevel: str | None = None, hostname: str | None = None,
               extra_args: Sequence[str] = ()) -> None:
    """Run a standalone solo-pool worker in this process until it is stopped (SIGTERM: the
    running job is interrupted and re-queued; SIGKILL: the reaper of another worker re-queues it)."""
    from celery import signals

    level = (loglevel or settings.log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass
    if settings.train_threads > 0:  # a standalone worker's process is its own: cap it whole
        import torch

        torch.set_num_threads(settings.train_threads)
    app = make_celery(settings)
    app.set_current()
    ctx = worker_context(app)

    def _on_shutdown(**_kwargs) -> None:
        ctx.shutdown.set()

    signals.worker_shutting_down.connect(_on_shutdown, weak=False)
    reaper = Reaper(ctx).start()
    try:
        app.worker_main(["worker", "--pool=solo", "--concurrency=1", f"--loglevel={level}", "-Q", QUEUE,
                         "-n", hostname or _hostname("worker"), "--without-gossip", "--without-mingle",
                         "--without-heartbeat", *extra_args])
    finally:
        reaper.stop()
        signals.worker_shutting_down.disconnect(_on_shutdown)

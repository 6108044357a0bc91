"""The ``train_adapter`` Celery task, registered on an app by ``make_celery``.

No module-level app: the task closes over the ``WorkerContext`` of the app it is
registered on, so tests and servers build as many independent apps as they like
(``shared=False``: a shared task would be copied onto every later app with the first
app's context).
"""
from __future__ import annotations

import socket
from typing import Any

from celery import Celery, Task
from sqlalchemy.exc import InterfaceError, OperationalError

from promptfleet.trainer.runner import WorkerContext, run_job

TASK_NAME = "promptfleet.trainer.train_adapter"
DB_RETRY_COUNTDOWN_S = 5
DB_RETRY_MAX = 120  # about ten minutes of an unreachable database


def register_tasks(app: Celery, ctx: WorkerContext) -> Task:
    @app.task(name=TASK_NAME, bind=True, shared=False, acks_late=True, reject_on_worker_lost=True,
              ignore_result=True)
    def train_adapter(self: Task, job_id: str) -> dict[str, Any]:
        worker = self.request.hostname or socket.gethostname()
        try:
            return run_job(ctx, job_id, task_id=self.request.id, worker=worker)
        except (OperationalError, InterfaceError) as exc:
            # The database is unreachable (a job's own errors never get here): deliver again
            # later instead of dropping the message of a job that would then stay queued.
            raise self.retry(exc=exc, countdown=DB_RETRY_COUNTDOWN_S, max_retries=DB_RETRY_MAX)

    return train_adapter

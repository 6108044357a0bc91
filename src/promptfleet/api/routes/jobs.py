"""``/v1/jobs``: submit a training job (202), follow it, cancel it (202). Thin routes over
``promptfleet.trainer.service``; another tenant's job (or dataset) is 404."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from promptfleet.api.deps import LimitedTenantDep, SessionDep, StateDep, plausible_id
from promptfleet.api.errors import APIError, not_found, too_many_requests
from promptfleet.api.pagination import PageDep, page_fields, unknown_cursor
from promptfleet.api.responses import error_responses
from promptfleet.api.schemas import JobCreated, JobList, JobOut
from promptfleet.paging import UnknownCursor
from promptfleet.trainer.models import JOB_STATUSES, TrainingJob
from promptfleet.trainer.schemas import JobRequest
from promptfleet.trainer.service import (EnqueueError, JobNotCancellable, NotFound, TooManyJobs, TrainingBudget,
                                         TrainingBudgetExceeded, cancel_job, get_job, list_jobs, submit_job)
from promptfleet.trainer.service import page_jobs

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def job_out(job: TrainingJob) -> JobOut:
    d = job.to_dict()
    return JobOut(**{k: d[k] for k in JobOut.model_fields if k in d})


@router.post("", status_code=202, response_model=JobCreated,
             responses=error_responses(400, 401, 403, 404, 413, 422, 429, 503))
def create_job(body: JobRequest, tenant: LimitedTenantDep, state: StateDep, session: SessionDep) -> JSONResponse:
    for dataset_id in (body.dataset_id, body.validation_dataset_id):
        if dataset_id is not None and not plausible_id(dataset_id):
            raise not_found(f"dataset {dataset_id!r} not found", code="dataset_not_found")
    settings = state.settings
    budget = TrainingBudget(per_job=settings.job_max_train_examples,
                            per_tenant_day=settings.tenant_train_examples_per_day)
    try:
        job = submit_job(session, tenant_id=tenant.id, request=body, enqueue=state.enqueue,
                         max_active_jobs=settings.tenant_max_running_jobs, budget=budget)
    except NotFound as exc:
        raise not_found(str(exc), code="dataset_not_found") from None
    except TrainingBudgetExceeded as exc:
        raise APIError(403, str(exc), code="training_budget_exceeded") from None
    except TooManyJobs as exc:
        raise too_many_requests(str(exc), retry_after=30, code="too_many_jobs") from None
    except EnqueueError as exc:
        raise APIError(503, str(exc), code="enqueue_failed", headers={"Retry-After": "5"}) from None
    return JSONResponse(JobCreated(id=job.id, status=job.status).model_dump(), status_code=202,
                        headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("", response_model=JobList, responses=error_responses(400, 401, 422, 429))
def get_jobs(tenant: LimitedTenantDep, session: SessionDep, page: PageDep,
             status: Annotated[str | None, Query(description=f"one of {', '.join(JOB_STATUSES)}")] = None) -> JobList:
    """The tenant's jobs (of ``status`` when given), newest first."""
    if status is not None and status not in JOB_STATUSES:
        raise APIError(400, f"status must be one of {', '.join(JOB_STATUSES)}", code="invalid_parameters",
                       param="status")
    if page.after is not None and not plausible_id(page.after):
        raise unknown_cursor(page.after)
    try:
        rows = page_jobs(session, tenant_id=tenant.id, limit=page.limit, after=page.after, status=status)
    except UnknownCursor:
        raise unknown_cursor(page.after or "") from None
    return JobList(data=[job_out(j) for j in rows.items], **page_fields([j.id for j in rows.items], rows.has_more))


@router.get("/{job_id}", response_model=JobOut, responses=error_responses(401, 404, 429))
def get_one_job(job_id: str, tenant: LimitedTenantDep, session: SessionDep) -> JobOut:
    if not plausible_id(job_id):
        raise not_found(f"job {job_id!r} not found", code="job_not_found")
    try:
        return job_out(get_job(session, tenant_id=tenant.id, job_id=job_id))
    except NotFound as exc:
        raise not_found(str(exc), code="job_not_found") from None


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, responses=error_responses(401, 404, 409, 429))
def cancel(job_id: str, tenant: LimitedTenantDep, session: SessionDep) -> JSONResponse:
    if not plausible_id(job_id):
        raise not_found(f"job {job_id!r} not found", code="job_not_found")
    try:
        job = cancel_job(session, tenant_id=tenant.id, job_id=job_id)
    except NotFound as exc:
        raise not_found(str(exc), code="job_not_found") from None
    except JobNotCancellable as exc:
        raise APIError(409, str(exc), code="job_not_cancellable") from None
    return JSONResponse(job_out(job).model_dump(mode="json"), status_code=202)

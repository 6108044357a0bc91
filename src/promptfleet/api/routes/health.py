"""Liveness and readiness (no authentication) and Prometheus metrics (a bearer key when
``metrics_key`` is set: labels carry tenant and adapter names)."""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from promptfleet.api.deps import bearer_token
from promptfleet.api.errors import unauthorized
from promptfleet.api.metrics import CONTENT_TYPE
from promptfleet.api.responses import error_responses
from promptfleet.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """200 while the process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses=error_responses(503))
async def readyz(request: Request) -> JSONResponse:
    """200 when the model is loaded and the database answers, else 503."""
    state = getattr(request.app.state, "pf", None)
    checks = {"model": "ok" if state is not None and state.engine is not None else "not loaded"}
    checks["database"] = "ok" if state is not None and await run_in_threadpool(state.db_ok) else "unavailable"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse(Health(status="ready", checks=checks).model_dump())
    failing = ", ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok")
    return JSONResponse({"error": {"message": f"not ready ({failing})", "type": "server_overloaded",
                                   "code": "not_ready"}}, status_code=503, headers={"Retry-After": "5"})


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE.split(";")[0]: {"schema": {"type": "string"}}},
                             "description": "Prometheus text format"}, **error_responses(401)})
async def metrics(request: Request) -> Response:
    key = getattr(request.app.state, "metrics_key", "")
    if key and not hmac.compare_digest(bearer_token(request).encode(), key.encode()):
        raise unauthorized("invalid metrics key")
    registry = request.app.state.metrics
    return Response(registry.render(), media_type=CONTENT_TYPE)

"""The FastAPI app factory.

    app = create_app(Settings(model="ckpt/"))          # builds everything in its lifespan
    app = create_app(settings, engine=engine)           # reuse an engine (tests, benchmarks)

The lifespan builds what is not passed in (see ``state.build_state``) and closes what it
built. Middleware is pure ASGI (no ``BaseHTTPMiddleware``), so streaming responses and
client disconnects pass straight through.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from promptfleet.api.errors import install_error_handlers
from promptfleet.api.logs import RequestContextMiddleware
from promptfleet.api.metrics import MetricLabelLimits, Metrics
from promptfleet.api.routes import admin, adapters, completions, datasets, health, jobs, models
from promptfleet.api.state import AppState, build_state
from promptfleet.api.uploads import MULTIPART_SLACK, BodyLimit, BodyLimitMiddleware, HeaderLimitMiddleware, mib
from promptfleet.console import install_console
from promptfleet.platform.engine import Engine
from promptfleet.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_BODY_LIMIT = 8 << 20  # JSON bodies (completions, jobs, admin)


def body_limit_for(settings: Settings):
    adapters_limit = BodyLimit((settings.max_upload_mb << 20) + MULTIPART_SLACK,
                               f"the adapter upload limit of {settings.max_upload_mb} MiB (max_upload_mb)")
    datasets_limit = BodyLimit((settings.max_dataset_mb << 20) + MULTIPART_SLACK,
                               f"the dataset upload limit of {settings.max_dataset_mb} MiB (max_dataset_mb)")
    default_limit = BodyLimit(DEFAULT_BODY_LIMIT, f"the request body limit of {mib(DEFAULT_BODY_LIMIT)}")

    def limit_for(method: str, path: str) -> BodyLimit | None:
        if method in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return None
        path = path.rstrip("/")
        if path == "/v1/adapters":
            return adapters_limit
        if path == "/v1/datasets":
            return datasets_limit
        return default_limit

    return limit_for


def create_app(settings: Settings, *, engine: Engine | None = None, celery_app: Any = None) -> FastAPI:
    metrics = Metrics(MetricLabelLimits.from_settings(settings))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: AppState = await run_in_threadpool(build_state, settings, metrics, engine=engine,
                                                  celery_app=celery_app)
        app.state.pf = state
        log.info("serving %s as %r (%s, %s)", settings.model or "the given engine", settings.model_id,
                 state.engine.device, str(state.engine.dtype).removeprefix("torch."))
        try:
            yield
        finally:
            app.state.pf = None
            await run_in_threadpool(state.close)

    app = FastAPI(title="PromptFleet", version="0.1.0", lifespan=lifespan,
                  description="Many prompt-tuning adapters on one shared GPT-2 backbone; OpenAI-compatible "
                              "completions. Authenticate with `Authorization: Bearer <key>`.")
    app.state.metrics = metrics
    app.state.metrics_key = settings.metrics_key
    app.state.pf = None
    install_error_handlers(app)
    for module in (completions, models, adapters, datasets, jobs, admin, health):
        app.include_router(module.router)
    install_console(app)  # /console: the web console's page, static files and usage route
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit_for(settings))
    app.add_middleware(HeaderLimitMiddleware)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    return app

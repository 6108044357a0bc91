"""Run the API under uvicorn (``promptfleet serve`` calls ``run_server``)."""
from __future__ import annotations

import logging

import uvicorn

from promptfleet.api.app import create_app
from promptfleet.api.logs import configure_logging
from promptfleet.settings import Settings

log = logging.getLogger(__name__)


def run_server(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Configure logging (``log_level``, ``log_json``) and serve until interrupted.

    One process holds one engine: scale out with more processes or machines, each its own
    server, not with uvicorn workers inside one."""
    configure_logging(level=settings.log_level, json_lines=settings.log_json)
    config = uvicorn.Config(create_app(settings), host=host, port=port, log_config=None, access_log=False, timeout_keep_alive=30,
                            timeout_graceful_shutdown=10, lifespan="on")
    log.info("PromptFleet API on http://%s:%d", host, port)
    uvicorn.Server(config).run()

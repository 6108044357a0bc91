"""The per-tenant REST API: OpenAI-compatible completions over the shared engine, the
adapter registry, datasets and training jobs. ``create_app(settings)`` builds the app;
``promptfleet.api.server.run_server`` serves it with uvicorn."""
from __future__ import annotations

from promptfleet.api.app import create_app

__all__ = ["create_app"]

"""The API in-process for tests: ``Settings`` for a test data dir, the app under
Starlette's TestClient, and the engine's own answer as the reference for HTTP outputs."""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptfleet.settings import Settings

ADMIN_KEY = "pf-admin-test-key"


def api_settings(data_dir: Path, checkpoint: Path, *, db_url: str | None = None, **overrides: Any) -> Settings:
    """Embedded defaults on ``data_dir`` (no embedded worker), the test admin key, small limits."""
    values: dict[str, Any] = dict(data_dir=data_dir, database_url=db_url, model=str(checkpoint), model_id="gpt2",
                                  admin_key=ADMIN_KEY, embedded_worker=False, max_tokens_limit=64,
                                  max_prompt_tokens=256)
    values.update(overrides)
    return Settings(**values)


@dataclass
class Api:
    app: Any
    client: Any  # fastapi.testclient.TestClient
    settings: Settings

    @property
    def state(self) -> Any:
        return self.app.state.pf

    @property
    def engine(self) -> Any:
        return self.state.engine

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_key}"}

    def new_tenant(self, prefix: str = "t", **limits: Any) -> tuple[str, dict[str, str]]:
        """Create a tenant through the admin API: ``(tenant id, its auth headers)``."""
        r = self.client.post("/admin/tenants", json={"name": f"{prefix}-{uuid.uuid4().hex[:8]}", **limits},
                             headers=self.admin())
        assert r.status_code == 201, r.text
        return r.json()["id"], {"Authorization": f"Bearer {r.json()['api_key']}"}

    def upload(self, headers: dict[str, str], name: str, archive: bytes) -> Any:
        return self.client.post("/v1/adapters", data={"name": name},
                                files={"file": ("adapter.zip", archive, "application/zip")}, headers=headers)


@contextmanager
def running_api(settings: Settings, *, engine: Any = None, celery_app: Any = None) -> Iterator[Api]:
    """``create_app`` under a TestClient (lifespan run), server exceptions as 500s."""
    from fastapi.testclient import TestClient

    from promptfleet.api import create_app

    app = create_app(settings, engine=engine, celery_app=celery_app)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(app=app, client=client, settings=settings)


def engine_reference(engine: Any, prompt: str | list[int], params: Any, adapter_dir: Path | None = None) -> str:
    """The engine's own answer to a request (no HTTP), the reference for API outputs."""
    from promptfleet.platform.adapter import load_adapter_dir

    prefix = None if adapter_dir is None else engine.build_adapter(load_adapter_dir(adapter_dir), "ref")
    return asyncio.run(engine.complete(prompt, params, prefix)).text

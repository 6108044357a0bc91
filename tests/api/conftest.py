"""API-test fixtures: apps over a real SQLite file or a fresh PostgreSQL database, a shared
engine on the small random checkpoint, PEFT-made adapters and their zips, a uvicorn
server in a thread for real-socket clients (the openai client, disconnects)."""
from __future__ import annotations

import asyncio
import io
import socket
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from promptfleet.api import create_app
from promptfleet.platform.adapter import load_adapter_dir
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.platform.sampling import SamplingParams
from promptfleet.settings import Settings
from promptfleet.testing import make_peft_adapter

ADMIN_KEY = "pf-admin-test-key"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# --------------------------------------------------------------------------- adapters


def zip_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(path.iterdir()):
            if f.is_file():
                zf.write(f, f.name)
    return buf.getvalue()


@pytest.fixture(scope="session")
def peft_dirs(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api-peft")
    specs = {"pt": ("prompt_tuning", 5, 11), "pt_v2": ("prompt_tuning", 3, 12), "prefix": ("prefix_tuning", 4, 13)}
    return {name: make_peft_adapter(small_checkpoint, root / name, m, n, s) for name, (m, n, s) in specs.items()}


@pytest.fixture(scope="session")
def peft_zips(peft_dirs: dict[str, Path]) -> dict[str, bytes]:
    return {name: zip_dir(path) for name, path in peft_dirs.items()}


# --------------------------------------------------------------------------- engine
@pytest.fixture(scope="session")
def api_engine(small_checkpoint: Path) -> Iterator[Engine]:
    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(max_batch_size=16))
    yield engine
    engine.stop()


def engine_reference(engine: Engine, prompt: str | list[int], params: SamplingParams,
                     adapter_dir: Path | None = None) -> str:
    """The engine's own answer to a request (no HTTP), the reference for API outputs."""
    prefix = None if adapter_dir is None else engine.build_adapter(load_adapter_dir(adapter_dir), "ref")
    return asyncio.run(engine.complete(prompt, params, prefix)).text


# --------------------------------------------------------------------------- databases
def _pg_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def api_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session's API tests (dropped at the end)."""
    if not _pg_available():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    import psycopg

    name = f"pf_api_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def limits_redis_url() -> str:
    """Redis db 14 for the shared tenant limits (keys under per-test prefixes, so nothing
    needs flushing). ``.ci/run`` starts Redis when it is down."""
    import redis

    url = "redis://127.0.0.1:6379/14"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_kind(request: pytest.FixtureRequest) -> str:
    return request.param


# --------------------------------------------------------------------------- apps
@dataclass
class Api:
    app: FastAPI
    client: TestClient
    settings: Settings

    @property
    def state(self):
        return self.app.state.pf

    @property
    def engine(self) -> Engine:
        return self.state.engine

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.settings.admin_key}"}

    def new_tenant(self, prefix: str = "t", **limits) -> tuple[str, dict[str, str]]:
        """Create a tenant through the admin API: ``(tenant id, its auth headers)``."""
        r = self.client.post("/admin/tenants", json={"name": f"{prefix}-{uuid.uuid4().hex[:8]}", **limits},
                             headers=self.admin())
        assert r.status_code == 201, r.text
        return r.json()["id"], {"Authorization": f"Bearer {r.json()['api_key']}"}

    def upload(self, headers: dict[str, str], name: str, archive: bytes):
        return self.client.post("/v1/adapters", data={"name": name},
                                files={"file": ("adapter.zip", archive, "application/zip")}, headers=headers)


def api_settings(data_dir: Path, checkpoint: Path, *, db_url: str | None = None, **overrides) -> Settings:
    values = dict(data_dir=data_dir, database_url=db_url, model=str(checkpoint), model_id="gpt2",
                  admin_key=ADMIN_KEY, embedded_worker=False, max_tokens_limit=64, max_prompt_tokens=256)
    values.update(overrides)
    return Settings(**values)


@contextmanager
def running_api(settings: Settings, *, engine: Engine | None = None, celery_app=None) -> Iterator[Api]:
    app = create_app(settings, engine=engine, celery_app=celery_app)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(app=app, client=client, settings=settings)


@pytest.fixture
def make_api(tmp_path: Path, small_checkpoint: Path, api_engine: Engine, request: pytest.FixtureRequest):
    """``make_api(db="sqlite"|"postgres", engine=None, **settings)`` -> a running ``Api``."""
    stack = []

    def make(db: str = "sqlite", engine: Engine | None = None, **overrides) -> Api:
        db_url = request.getfixturevalue("api_pg_url") if db == "postgres" else None
        data_dir = tmp_path / f"data-{len(stack)}"
        settings = api_settings(data_dir, small_checkpoint, db_url=db_url, **overrides)
        cm = running_api(settings, engine=engine or api_engine)
        stack.append(cm)
        return cm.__enter__()

    yield make
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


# --------------------------------------------------------------------------- real server
@dataclass
class LiveServer:
    app: FastAPI
    base_url: str
    server: uvicorn.Server

    @property
    def state(self):
        return self.app.state.pf


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app: FastAPI) -> Iterator[LiveServer]:
    """The app under uvicorn on a free loopback port, in a background thread."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(app=app, base_url=f"http://127.0.0.1:{port}", server=server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# --------------------------------------------------------------------------- helpers as fixtures
# (test modules cannot import conftest under --import-mode=importlib)
@pytest.fixture(scope="session")
def helpers():
    class Helpers:
        reference = staticmethod(engine_reference)
        live_server = staticmethod(live_server)
        wait_until = staticmethod(wait_until)
        zip_dir = staticmethod(zip_dir)
        make_peft_adapter = staticmethod(make_peft_adapter)
        running_api = staticmethod(running_api)
        api_settings = staticmethod(api_settings)

    return Helpers

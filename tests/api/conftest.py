"""API-test fixtures: apps over a real SQLite file or a fresh PostgreSQL database, a shared
engine on the small random checkpoint, and PEFT-made adapters and their zips. The helpers
behind them (settings, in-process apps, a uvicorn server in a thread, the engine's own
answer as reference) live in ``promptfleet.testing`` and are imported by the tests."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from promptfleet.client import zip_directory
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.testing.api_app import Api, api_settings, running_api
from promptfleet.testing.peft import make_peft_adapter
from promptfleet.testing.services import PgDatabases, require_redis


@pytest.fixture(scope="session")
def peft_dirs(small_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api-peft")
    specs = {"pt": ("prompt_tuning", 5, 11), "pt_v2": ("prompt_tuning", 3, 12), "prefix": ("prefix_tuning", 4, 13)}
    return {name: make_peft_adapter(small_checkpoint, root / name, m, n, s) for name, (m, n, s) in specs.items()}


@pytest.fixture(scope="session")
def peft_zips(peft_dirs: dict[str, Path]) -> dict[str, bytes]:
    return {name: zip_directory(path) for name, path in peft_dirs.items()}


@pytest.fixture(scope="session")
def api_engine(small_checkpoint: Path) -> Iterator[Engine]:
    engine = Engine.from_pretrained(small_checkpoint, EngineConfig(max_batch_size=16))
    yield engine
    engine.stop()


@pytest.fixture(scope="session")
def api_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session's API tests (dropped at the end);
    PostgreSQL missing skips, or fails under ``CI=true``."""
    dbs = PgDatabases(prefix="pf_api")
    try:
        yield dbs.create()
    finally:
        dbs.drop_all()


@pytest.fixture(scope="session")
def limits_redis_url() -> str:
    """Redis db 14 for the shared tenant limits (keys under per-test prefixes, so nothing
    needs flushing). ``.ci/run`` starts Redis when it is down."""
    return require_redis(14)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_kind(request: pytest.FixtureRequest) -> str:
    return request.param


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

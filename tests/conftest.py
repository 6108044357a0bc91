"""Shared fixtures: seeded random GPT-2 checkpoints saved in Hugging Face format."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from promptfleet.platform.random_checkpoint import make_random_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 layers, d=64; weights scaled up so greedy decoding has clear winners."""
    return make_random_checkpoint(tmp_path_factory.mktemp("tiny-gpt2"), shape="tiny", seed=1234, scale=8.0)


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 layers, d=128: big enough for a meaningful mixed-batch test, small enough for CI."""
    return make_random_checkpoint(tmp_path_factory.mktemp("small-gpt2"), shape="small-test", seed=99, scale=6.0)


# --- database fixtures: a migrated database per test, on SQLite and on PostgreSQL -----------
# PostgreSQL: a fresh, uniquely named database created through the ``postgres`` database
# (override with PROMPTFLEET_TEST_POSTGRES_URL) and dropped afterwards. Skipped, with the
# reason, when no server answers; deselect with ``-m "not postgres"``.

import os  # noqa: E402
import uuid  # noqa: E402

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402

DEFAULT_POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path):
    """URL of a fresh, unmigrated database (SQLite file or a new PostgreSQL database)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'promptfleet.db'}"
        return
    admin_url = make_url(os.environ.get("PROMPTFLEET_TEST_POSTGRES_URL", DEFAULT_POSTGRES_ADMIN_URL))
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"pf_test_{uuid.uuid4().hex[:16]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL is not reachable at {admin_url.render_as_string(hide_password=True)}: "
                    f"{str(exc).splitlines()[0]}")
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def db_url(empty_db_url: str) -> str:
    """URL of a fresh database migrated to head."""
    from promptfleet.migrate import upgrade

    upgrade(empty_db_url)
    return empty_db_url


@pytest.fixture
def session_factory(db_url: str):
    """A ``sessionmaker`` bound to the migrated test database (use with ``session_scope``)."""
    from promptfleet.db import make_engine, make_session_factory

    engine = make_engine(db_url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()

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
# reason, when no server answers, and a failure under CI=true; deselect with ``-m "not postgres"``.

from collections.abc import Iterator  # noqa: E402

from promptfleet.testing.services import PgDatabases  # noqa: E402


@pytest.fixture
def postgres_db_url() -> Iterator[str]:
    """URL of a fresh, unmigrated PostgreSQL database, dropped afterwards."""
    dbs = PgDatabases(prefix="pf_test")
    try:
        yield dbs.create()
    finally:
        dbs.drop_all()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a fresh, unmigrated database (SQLite file or a new PostgreSQL database)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'promptfleet.db'}"
    return request.getfixturevalue("postgres_db_url")


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

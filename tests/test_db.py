"""promptfleet.db on the real databases: what each connection is set up with."""
from __future__ import annotations

import pytest
from sqlalchemy import text

from promptfleet.db import POSTGRES_CONNECT_ARGS, make_engine


def test_sqlite_connections_get_wal_foreign_keys_and_a_busy_timeout(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'pf.db'}")  # the folder is created
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    engine.dispose()


@pytest.mark.postgres
def test_postgres_connections_carry_timeouts_and_keepalives(postgres_db_url):
    engine = make_engine(postgres_db_url)
    with engine.connect() as conn:
        params = conn.connection.dbapi_connection.info.get_parameters()
    engine.dispose()
    assert {k: params.get(k) for k in POSTGRES_CONNECT_ARGS} == {k: str(v) for k, v in POSTGRES_CONNECT_ARGS.items()}

"""Alembic migrations run from empty to head and back to base, on SQLite and PostgreSQL."""
from __future__ import annotations

from sqlalchemy import inspect

from promptfleet.db import make_engine
from promptfleet.migrate import current_revision, downgrade, head_revision, upgrade

REGISTRY_TABLES = {"tenants", "api_keys", "adapter_versions"}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_then_downgrade(empty_db_url):
    assert current_revision(empty_db_url) is None
    upgrade(empty_db_url)
    assert current_revision(empty_db_url) == head_revision()
    assert REGISTRY_TABLES <= _tables(empty_db_url)
    downgrade(empty_db_url, "0001_registry")
    assert current_revision(empty_db_url) == "0001_registry"
    assert REGISTRY_TABLES <= _tables(empty_db_url)
    downgrade(empty_db_url)
    assert current_revision(empty_db_url) is None
    assert _tables(empty_db_url) <= {"alembic_version"}
    upgrade(empty_db_url)  # and up again from base
    assert current_revision(empty_db_url) == head_revision()


def test_models_match_migrations(db_url):
    """Autogenerate finds nothing to add: the ORM models and the migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    import promptfleet.adapters.models  # noqa: F401
    import promptfleet.tenants.models  # noqa: F401
    from promptfleet.db import Base

    def ours(obj, name, type_, reflected, compare_to) -> bool:
        table = obj if type_ == "table" else getattr(obj, "table", None)
        return table is not None and table.name in REGISTRY_TABLES

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"include_object": ours, "compare_type": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []

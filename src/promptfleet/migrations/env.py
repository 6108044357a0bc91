"""Alembic environment: the URL comes from the Config (set by ``promptfleet.migrate``), else
``PROMPTFLEET_DATABASE_URL``, else the settings' default; all ORM models are imported so
``alembic revision --autogenerate`` sees every table."""
from __future__ import annotations

import importlib
import importlib.util
import logging.config

from alembic import context

from promptfleet.db import Base, make_engine

# Every module that defines ORM models; a module not written yet is skipped.
MODEL_MODULES = (
    "promptfleet.tenants.models",
    "promptfleet.adapters.models",
    "promptfleet.trainer.models",
)

config = context.config
if config.config_file_name is not None and config.file_config.has_section("loggers"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _import_models() -> None:
    for name in MODEL_MODULES:
        parent = name.rsplit(".", 1)[0]
        if importlib.util.find_spec(parent) is not None and importlib.util.find_spec(name) is not None:
            importlib.import_module(name)


def _database_url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from promptfleet.settings import Settings

    return Settings().resolved_database_url()  # reads PROMPTFLEET_DATABASE_URL


_import_models()
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    url = _database_url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"), dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    engine = make_engine(_database_url())
    try:
        with engine.connect() as conn:
            _run_with(conn)
    finally:
        engine.dispose()


def _run_with(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

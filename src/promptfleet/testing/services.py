"""PostgreSQL and Redis for tests, at their default local ports: reachability checks that
skip (or fail under ``CI=true``, see ``skips.missing``), and fresh PostgreSQL databases
dropped afterwards."""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field

from promptfleet.testing.skips import missing

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def pg_admin_url() -> str:
    """psycopg URL of the server's ``postgres`` database (``PROMPTFLEET_TEST_POSTGRES_URL`` overrides)."""
    url = os.environ.get("PROMPTFLEET_TEST_POSTGRES_URL", f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/postgres")
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_postgres() -> None:
    """Skip (fail under CI) unless PostgreSQL answers at 127.0.0.1:5432."""
    if not port_open(PG_HOST, PG_PORT):
        missing(f"PostgreSQL is not reachable at {PG_HOST}:{PG_PORT}")


def require_redis(db: int = 0) -> str:
    """``redis://`` URL of database ``db``; skip (fail under CI) unless Redis answers a PING."""
    import redis

    url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        missing(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT}: {exc}")
    finally:
        client.close()
    return url


def flush_redis(db: int) -> None:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=2)
    try:
        client.flushdb()
    finally:
        client.close()


@dataclass
class PgDatabases:
    """Fresh, uniquely named PostgreSQL databases, dropped (WITH FORCE) by ``drop_all``."""

    prefix: str = "pf_test"
    names: list[str] = field(default_factory=list)

    def create(self) -> str:
        """A new empty database: its SQLAlchemy (psycopg) URL."""
        import psycopg

        require_postgres()
        name = f"{self.prefix}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg_admin_url(), autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        admin = pg_admin_url()
        return f"postgresql+psycopg://{admin.split('://', 1)[1].rsplit('/', 1)[0]}/{name}"

    def drop_all(self) -> None:
        import psycopg

        if not self.names:
            return
        with psycopg.connect(pg_admin_url(), autocommit=True, connect_timeout=5) as conn:
            for name in self.names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.names.clear()

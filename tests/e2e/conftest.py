"""End-to-end fixtures: REAL processes. ``python -m promptfleet.cli serve`` and
``python -m promptfleet.cli worker`` run as subprocesses (``promptfleet.testing.stack``)
on a fresh PostgreSQL database, a flushed Redis database and a temporary data dir;
``promptfleet db upgrade`` runs first, through the CLI. A TCP proxy
(``promptfleet.testing.tcp_proxy``) can take "PostgreSQL" away from the server.

PostgreSQL and Redis missing: skipped with the reason, a failure under ``CI=true``.
All traffic stays on 127.0.0.1; every wait is bounded."""
from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from promptfleet.testing.services import (PG_HOST, PG_PORT, REDIS_HOST, REDIS_PORT, PgDatabases, flush_redis,
                                          require_postgres, require_redis)
from promptfleet.testing.stack import Stack
from promptfleet.testing.tcp_proxy import TcpProxy

E2E_REDIS_DBS = (9, 10, 11, 12, 13)  # the trainer tests use 15; each stack takes the next one and flushes it
_redis_dbs = itertools.cycle(E2E_REDIS_DBS)


@pytest.fixture(scope="module")
def stack_factory(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """``make(checkpoint=None, database_url=None, proxy=None, **env)`` -> a ``Stack`` whose
    database is migrated by ``promptfleet db upgrade`` (server not started yet). Everything
    is stopped, dropped and flushed at the end of the module."""
    require_postgres()
    require_redis()
    dbs = PgDatabases(prefix="pf_e2e")
    stacks: list[Stack] = []
    redis_dbs: list[int] = []

    def make(*, checkpoint: Path | None = None, database_url: str | None = None,
             proxy: TcpProxy | None = None, **extra_env: str) -> Stack:
        url = database_url or dbs.create()
        redis_db = next(_redis_dbs)
        flush_redis(redis_db)
        redis_dbs.append(redis_db)
        server_url = None
        if proxy is not None:
            server_url = url.replace(f"@{PG_HOST}:{PG_PORT}/", f"@127.0.0.1:{proxy.port}/")
        stack = Stack(root=tmp_path_factory.mktemp("e2e-stack"), checkpoint=checkpoint or tiny_checkpoint,
                      database_url=url, redis_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
                      admin_key=f"pf-admin-e2e-{uuid.uuid4().hex}", server_database_url=server_url,
                      extra_env={k.upper() if k.startswith("PROMPTFLEET_") else f"PROMPTFLEET_{k.upper()}": str(v)
                                 for k, v in extra_env.items()})
        stacks.append(stack)
        done = stack.cli("db", "upgrade")
        assert done.returncode == 0, f"promptfleet db upgrade failed:\n{done.stdout}\n{done.stderr}"
        assert "upgraded to head" in done.stdout, done.stdout
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            stack.close()
        try:
            dbs.drop_all()
        finally:
            for db in redis_dbs:
                try:
                    flush_redis(db)
                except Exception:  # pragma: no cover - keep flushing the others
                    pass


@pytest.fixture(scope="module")
def pg_proxy() -> Iterator[TcpProxy]:
    require_postgres()
    proxy = TcpProxy((PG_HOST, PG_PORT)).up()
    try:
        yield proxy
    finally:
        proxy.close()


def learnable_jsonl(n: int = 16, completion: str = " the fleet sails") -> bytes:
    words = ["apple", "river", "stone", "cloud", "seven", "green", "table", "north"]
    lines = [json.dumps({"prompt": f"{words[i % 8]} {words[(i * 3) % 8]}:", "completion": completion})
             for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="session")
def jsonl() -> Callable[..., bytes]:
    """``jsonl(n=16, completion=...)``: a small dataset a prompt-tuning job can learn."""
    return learnable_jsonl

"""A deployment across hosts as real processes: N ``serve`` replicas and M ``worker``
processes, each a "host" of its own (a ``Stack`` with its own EMPTY data dir), sharing one
PostgreSQL database, one Redis database and one S3 bucket (``PROMPTFLEET_BLOB_URL=s3://``
with ``AWS_ENDPOINT_URL``). Nothing a process needs may live only on its own disk.

The S3 endpoint the processes use is a ``TcpProxy`` in front of the test server, so a test
can take the store away and bring it back intact (``Fleet.s3``)."""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from promptfleet.adapters.s3_local import TcpProxy
from promptfleet.testing.stack import Stack

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


@dataclass
class FleetConfig:
    """What every host shares (database, Redis, bucket) and the settings they all get."""

    checkpoint: Path
    database_url: str
    redis_url: str
    blob_url: str                 # s3://bucket/prefix
    s3_endpoint: str              # what the processes dial (the proxy)
    admin_key: str = field(default_factory=lambda: f"pf-admin-fleet-{uuid.uuid4().hex}")
    env: dict[str, str] = field(default_factory=dict)  # PROMPTFLEET_* (and AWS_*) for every process

    def host_env(self) -> dict[str, str]:
        return {"PROMPTFLEET_BLOB_URL": self.blob_url, "AWS_ENDPOINT_URL": self.s3_endpoint, **S3_CREDENTIALS,
                **self.env}


@dataclass
class Fleet:
    """Replicas (``serve`` processes, by name) and worker hosts; each has its own root and
    data dir under ``root``. ``s3`` is the proxy every process reaches the store through."""

    root: Path
    config: FleetConfig
    s3: TcpProxy
    replicas: dict[str, Stack] = field(default_factory=dict)
    worker_hosts: dict[str, Stack] = field(default_factory=dict)

    def _host(self, name: str, **env: str) -> Stack:
        root = self.root / name
        root.mkdir(parents=True)
        host = Stack(root=root, checkpoint=self.config.checkpoint, database_url=self.config.database_url,
                     redis_url=self.config.redis_url, admin_key=self.config.admin_key,
                     extra_env={**self.config.host_env(), "PROMPTFLEET_REPLICA_ID": name, **env})
        assert not host.data_dir.exists(), f"{name}'s data dir is not empty"
        return host

    def migrate(self) -> None:
        """``promptfleet db upgrade`` once, through the CLI of a throwaway host."""
        done = self._host("migrate").cli("db", "upgrade")
        assert done.returncode == 0, f"promptfleet db upgrade failed:\n{done.stdout}\n{done.stderr}"

    def add_replica(self, name: str, **env: str) -> Stack:
        host = self.replicas[name] = self._host(name, **env)
        host.start_server(wait=False)
        return host

    def add_worker(self, name: str, **env: str) -> Stack:
        host = self.worker_hosts[name] = self._host(name, **env)
        host.start_worker(name)
        return host

    def wait_ready(self, timeout: float = 180) -> None:
        for host in self.replicas.values():
            host.wait_ready(timeout=timeout)

    def hosts(self) -> Iterable[Stack]:
        return [*self.replicas.values(), *self.worker_hosts.values()]

    def logs(self) -> str:
        parts = [f"=== replica {n}\n{h.logs()}" for n, h in self.replicas.items()]
        parts += [f"=== worker host {n}\n{h.worker_logs()}" for n, h in self.worker_hosts.items()]
        return "\n".join(parts)

    def local_blob_files(self) -> list[Path]:
        """Files in any host's local blob directory (with S3 storage there must be none)."""
        return [p for h in self.hosts() if (h.data_dir / "blobs").exists()
                for p in (h.data_dir / "blobs").rglob("*") if p.is_file()]

    def close(self) -> None:
        for host in self.hosts():
            host.close()

    # -- HTTP
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.config.admin_key}"}

    def new_tenant(self, prefix: str, via: str, **limits) -> str:
        """Create a tenant through replica ``via``'s admin API; its API key."""
        return self.replicas[via].new_tenant(prefix, **limits)

    def wait_job(self, key: str, job_id: str, *, until: Callable[[dict], bool], via: str, timeout: float = 120,
                 what: str = "the job") -> dict:
        return self.replicas[via].wait_job(key, job_id, until=until, timeout=timeout, what=what, on_timeout=self.logs)

    def warm(self, via: str) -> list[dict]:
        """Replica ``via``'s warm adapters (``GET /admin/cache/adapters``)."""
        r = httpx.get(f"{self.replicas[via].base_url}/admin/cache/adapters", headers=self.admin_headers(), timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["data"]

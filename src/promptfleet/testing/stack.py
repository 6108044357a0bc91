"""One deployment of PromptFleet as real processes: ``python -m promptfleet.cli serve``
(restartable on the same port) and ``worker`` processes on one PostgreSQL database, one
Redis database and one data dir, driven over HTTP and through the CLI."""
from __future__ import annotations

import itertools
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from promptfleet.testing.live_server import free_port
from promptfleet.testing.polling import wait_for
from promptfleet.testing.processes import Proc, python_env, tail


@dataclass
class Stack:
    """One deployment: a server process (restartable on the same port), worker processes,
    one PostgreSQL database, one Redis database, one data dir."""

    root: Path
    checkpoint: Path
    database_url: str                   # what workers and the CLI use
    redis_url: str
    admin_key: str
    port: int = field(default_factory=free_port)
    server_database_url: str | None = None  # what the server uses (e.g. through the proxy)
    extra_env: dict[str, str] = field(default_factory=dict)
    server: Proc | None = None
    workers: list[Proc] = field(default_factory=list)
    _all: list[Proc] = field(default_factory=list)
    _starts: itertools.count = field(default_factory=itertools.count)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, database_url: str | None = None) -> dict[str, str]:
        return python_env({
            "PROMPTFLEET_DATABASE_URL": database_url or self.database_url,
            "PROMPTFLEET_BROKER_URL": self.redis_url,
            "PROMPTFLEET_DATA_DIR": str(self.data_dir),
            "PROMPTFLEET_ADMIN_KEY": self.admin_key,
            "PROMPTFLEET_MODEL": str(self.checkpoint),
            "PROMPTFLEET_MODEL_ID": "gpt2",
            "PROMPTFLEET_DEVICE": "cpu",
            "PROMPTFLEET_JOB_HEARTBEAT_S": "0.2",
            "PROMPTFLEET_JOB_STALE_AFTER_S": "3",
            "PROMPTFLEET_MAX_TOKENS_LIMIT": "64",
            **self.extra_env,
        })

    # -- processes
    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "promptfleet.cli", *args], env=self.env(), timeout=timeout,
                              capture_output=True, text=True)

    def start_server(self, *, wait: bool = True) -> Proc:
        assert self.server is None or not self.server.alive, "the server is already running"
        n = next(self._starts)
        self.server = Proc([sys.executable, "-m", "promptfleet.cli", "serve", "--model", str(self.checkpoint),
                            "--port", str(self.port), "--no-embedded-worker"],
                           self.env(self.server_database_url), self.root / f"server-{n}.log", f"server-{n}")
        self._all.append(self.server)
        if wait:
            self.wait_ready()
        return self.server

    def wait_ready(self, timeout: float = 120) -> None:
        server = self.server
        assert server is not None

        def ready() -> bool:
            if not server.alive:
                raise AssertionError(f"the server exited with {server.proc.returncode}:\n{tail(server.log())}")
            try:
                return httpx.get(f"{self.base_url}/readyz", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout=timeout, interval=0.2, what="the server to be ready",
                 on_timeout=lambda: tail(server.log()))

    def stop_server(self, timeout: float = 30) -> None:
        if self.server is not None:
            self.server.stop(timeout=timeout)

    def restart_server(self) -> Proc:
        self.stop_server()
        return self.start_server()

    def start_worker(self, name: str) -> Proc:
        worker = Proc([sys.executable, "-m", "promptfleet.cli", "worker", "--loglevel", "INFO",
                       "--hostname", f"{name}@e2e"], self.env(), self.root / f"{name}.log", name)
        self.workers.append(worker)
        self._all.append(worker)
        return worker

    def worker_logs(self) -> str:
        return "\n".join(f"--- {w.name}\n{tail(w.log(), 3000)}" for w in self.workers)

    def logs(self) -> str:
        server = f"--- server\n{tail(self.server.log())}" if self.server else ""
        return f"{server}\n{self.worker_logs()}"

    def close(self) -> None:
        for proc in reversed(self._all):
            try:
                proc.stop(timeout=10)
            except Exception:  # pragma: no cover - keep stopping the others
                proc.kill()

    # -- HTTP
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def client(self, key: str | None = None, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def new_tenant(self, prefix: str, **limits) -> str:
        """Create a tenant through the admin API; its API key."""
        r = httpx.post(f"{self.base_url}/admin/tenants", json={"name": f"{prefix}-{uuid.uuid4().hex[:6]}", **limits},
                       headers=self.admin_headers(), timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["api_key"]

    def wait_job(self, key: str, job_id: str, *, until: Callable[[dict], bool], timeout: float = 120,
                 interval: float = 0.2, what: str = "the job", on_timeout: Callable[[], str] | None = None) -> dict:
        with self.client(key) as c:
            def check():
                r = c.get(f"/v1/jobs/{job_id}")
                assert r.status_code == 200, r.text
                job = r.json()
                return job if until(job) else None

            return wait_for(check, timeout=timeout, interval=interval, what=what, on_timeout=on_timeout or self.logs)

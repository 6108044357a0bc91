"""End-to-end fixtures: REAL processes. ``python -m promptfleet.cli serve`` and
``python -m promptfleet.cli worker`` run as subprocesses (each in its own process group,
logging to a file, killed by a finalizer whatever happens) on a fresh PostgreSQL database,
a flushed Redis database and a temporary data dir; ``promptfleet db upgrade`` runs first,
through the CLI. Also here: an asyncio TCP proxy that can take "PostgreSQL" away from the
server, PEFT-made adapters, the PEFT reference, and an SSE reader.

Test modules cannot import this file (``--import-mode=importlib``): helpers reach them as
fixtures (``e2e``). All traffic stays on 127.0.0.1; every wait is bounded.
"""
from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

from promptfleet.testing import make_peft_adapter, wait_for

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
E2E_REDIS_DBS = (9, 10, 11, 12, 13)  # the trainer tests use 15; each stack takes the next one and flushes it
_redis_dbs = itertools.cycle(E2E_REDIS_DBS)


# --------------------------------------------------------------------------- small helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def tail(text: str, n: int = 6000) -> str:
    return text[-n:]


# --------------------------------------------------------------------------- processes
class Proc:
    """A subprocess in its own session (process group), stdout+stderr to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, name: str) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL to the whole group: no handler runs. Only while the process is ours
        (not yet reaped), so a recycled pid is never signalled."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:  # pragma: no cover - the kernel owes us this one
                pass
        self._close_log()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``."""
        if self.alive:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def _close_log(self) -> None:
        if not self._log.closed:
            self._log.close()


def _python_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTFLEET_")}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    env.update(extra)
    return env


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
        return _python_env({
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
                 interval: float = 0.2, what: str = "the job") -> dict:
        with self.client(key) as c:
            def check():
                r = c.get(f"/v1/jobs/{job_id}")
                assert r.status_code == 200, r.text
                job = r.json()
                return job if until(job) else None

            return wait_for(check, timeout=timeout, interval=interval, what=what, on_timeout=self.logs)


# --------------------------------------------------------------------------- databases
@dataclass
class PgDatabases:
    """Fresh PostgreSQL databases, dropped (WITH FORCE) at teardown."""

    names: list[str] = field(default_factory=list)

    def create(self) -> str:
        import psycopg

        name = f"pf_e2e_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.names.append(name)
        return f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"

    def drop_all(self) -> None:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            for name in self.names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.names.clear()


def _flush_redis(db: int) -> None:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_connect_timeout=2)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(scope="module")
def stack_factory(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """``make(checkpoint=None, server_database_url=None, **env)`` -> a ``Stack`` whose
    database is migrated by ``promptfleet db upgrade`` (server not started yet). Everything
    is stopped, dropped and flushed at the end of the module."""
    if not port_open(PG_HOST, PG_PORT):
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    if not port_open(REDIS_HOST, REDIS_PORT):
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    dbs = PgDatabases()
    stacks: list[Stack] = []
    redis_dbs: list[int] = []

    def make(*, checkpoint: Path | None = None, database_url: str | None = None,
             proxy: "TcpProxy | None" = None, **extra_env: str) -> Stack:
        url = database_url or dbs.create()
        redis_db = next(_redis_dbs)
        _flush_redis(redis_db)
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
                    _flush_redis(db)
                except Exception:  # pragma: no cover
                    pass


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (dropped afterwards)."""
    if not port_open(PG_HOST, PG_PORT):
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    dbs = PgDatabases()
    try:
        yield dbs.create()
    finally:
        dbs.drop_all()


# --------------------------------------------------------------------------- TCP proxy
class TcpProxy:
    """An asyncio TCP proxy on 127.0.0.1 in a thread of the test process, in front of
    ``target``. ``down()`` stops listening (new connections are refused) and aborts every
    open connection (RST), as a crashed or restarting PostgreSQL would look to its clients;
    ``up()`` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None
        self._transports: set[asyncio.Transport] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="e2e-tcp-proxy", daemon=True)
        self._thread.start()

    def _call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.target), 5)
        except (OSError, asyncio.TimeoutError):
            writer.transport.abort()
            return
        pair = {writer.transport, up_writer.transport}
        self._transports |= pair
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self._transports -= pair

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    def up(self) -> "TcpProxy":
        self._call(self._listen())
        return self

    def down(self) -> None:
        self._call(self._down())

    async def _shutdown(self) -> None:
        await self._down()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()


@pytest.fixture(scope="module")
def pg_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy((PG_HOST, PG_PORT)).up()
    try:
        yield proxy
    finally:
        proxy.close()


# --------------------------------------------------------------------------- adapters and references


def zip_dir(path: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(path.iterdir()):
            if f.is_file():
                zf.write(f, f.name)
    return buf.getvalue()


def tar_gz_dir(path: Path, folder: str = "adapter") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for f in sorted(path.iterdir()):
            if f.is_file():
                tf.add(f, arcname=f"{folder}/{f.name}")
    return buf.getvalue()


def unzip_to(data: bytes, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            name = Path(info.filename).name
            if name:
                (out / name).write_bytes(zf.read(info))
    return out


class PeftReference:
    """The single-request reference: PEFT's ``generate`` on one request alone, greedy,
    ``use_cache=False`` (see tests/platform/conftest.py: PeftModel.generate's cached path
    re-prepends the soft prompt at every decode step with transformers 5 + peft 0.21).
    Models are loaded once per adapter; answers memoised per (adapter, prompt, n)."""

    EOS = 50256

    def __init__(self, checkpoint: Path) -> None:
        from promptfleet.platform.tokenizer import load_tokenizer

        self.checkpoint = checkpoint
        self.tokenizer = load_tokenizer(checkpoint)
        self._models: dict[str | None, object] = {}
        self._answers: dict[tuple, tuple[str, str]] = {}

    def _model(self, adapter_dir: Path | None):
        from peft import PeftModel
        from transformers import GPT2LMHeadModel

        key = None if adapter_dir is None else str(adapter_dir)
        if key not in self._models:
            base = GPT2LMHeadModel.from_pretrained(self.checkpoint).eval()
            self._models[key] = base if adapter_dir is None else PeftModel.from_pretrained(base, adapter_dir).eval()
        return self._models[key]

    def ids(self, adapter_dir: Path | None, prompt: str, max_new_tokens: int) -> list[int]:
        model = self._model(adapter_dir)
        prompt_ids = self.tokenizer.encode(prompt)
        x = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=self.EOS, eos_token_id=self.EOS, use_cache=False)
        return out[0, len(prompt_ids):].tolist()

    def answer(self, adapter_dir: Path | None, prompt: str, max_new_tokens: int) -> tuple[str, str]:
        """``(text, finish_reason)`` the server must answer for this greedy request."""
        key = (None if adapter_dir is None else str(adapter_dir), prompt, max_new_tokens)
        if key not in self._answers:
            ids = self.ids(adapter_dir, prompt, max_new_tokens)
            finish = "length"
            if self.EOS in ids:
                ids, finish = ids[:ids.index(self.EOS)], "stop"
            self._answers[key] = (self.tokenizer.decode(ids), finish)
        return self._answers[key]


# --------------------------------------------------------------------------- SSE
@dataclass
class StreamResult:
    status: int
    chunks: list[dict]
    done: int            # how many "data: [DONE]" events
    after_done: int      # events after the first [DONE] (must be 0)
    errors: list[dict]

    @property
    def text(self) -> str:
        return "".join(c["choices"][0]["text"] for c in self.chunks if c.get("choices"))

    @property
    def finish_reasons(self) -> list[str]:
        return [c["choices"][0]["finish_reason"] for c in self.chunks
                if c.get("choices") and c["choices"][0].get("finish_reason") is not None]

    @property
    def ids(self) -> set[str]:
        return {c["id"] for c in self.chunks}


def parse_sse(status: int, lines: list[str]) -> StreamResult:
    chunks, errors, done, after = [], [], 0, 0
    for line in lines:
        if not line.startswith("data: "):
            continue
        payload = line[6:]
        if done:
            after += 1
        if payload == "[DONE]":
            done += 1
            continue
        obj = json.loads(payload)
        (errors if "error" in obj else chunks).append(obj)
    return StreamResult(status, chunks, done, after, errors)


def stream_completion(client: httpx.Client, key: str, body: dict) -> StreamResult:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True},
                       headers={"Authorization": f"Bearer {key}"}) as r:
        if r.status_code != 200:
            r.read()
            return StreamResult(r.status_code, [], 0, 0, [r.json()])
        return parse_sse(r.status_code, list(r.iter_lines()))


# --------------------------------------------------------------------------- the helpers fixture
@pytest.fixture(scope="session")
def e2e():
    class Helpers:
        wait_for = staticmethod(wait_for)
        make_peft_adapter = staticmethod(make_peft_adapter)
        zip_dir = staticmethod(zip_dir)
        tar_gz_dir = staticmethod(tar_gz_dir)
        unzip_to = staticmethod(unzip_to)
        parse_sse = staticmethod(parse_sse)
        stream_completion = staticmethod(stream_completion)
        PeftReference = PeftReference
        tail = staticmethod(tail)
        free_port = staticmethod(free_port)

    return Helpers


def learnable_jsonl(n: int = 16, completion: str = " the fleet sails") -> bytes:
    words = ["apple", "river", "stone", "cloud", "seven", "green", "table", "north"]
    lines = [json.dumps({"prompt": f"{words[i % 8]} {words[(i * 3) % 8]}:", "completion": completion})
             for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="session")
def jsonl() -> Callable[..., bytes]:
    return learnable_jsonl

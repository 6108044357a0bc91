"""Fixtures for the trainer tests: two tenants, blob storage, settings for workers, Redis,
and a real ``promptfleet.trainer.worker_main`` process."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from promptfleet.adapters.storage import LocalBlobStorage
from promptfleet.db import session_scope
from promptfleet.settings import Settings
from promptfleet.tenants.service import create_tenant
from promptfleet.testing.skips import missing

REDIS_URL = "redis://127.0.0.1:6379/15"
WORDS = ["apple", "river", "stone", "cloud", "seven", "green", "table", "north", "quiet", "lamp"]


def learnable_jsonl(n: int = 24, *, completion: str = " the fleet sails", seed: int = 0) -> bytes:
    rng = random.Random(seed)
    lines = [json.dumps({"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + ":",
                         "completion": completion}) for _ in range(n)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are tiny: one intra-op thread is as fast idle and many times faster when
    the two CI cores are shared (OpenMP threads spin-waiting on a busy core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def jsonl() -> Callable[..., bytes]:
    return learnable_jsonl


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def storage(data_dir: Path) -> LocalBlobStorage:
    """The same blob folder the worker's ``Settings.blob_dir`` points at."""
    return LocalBlobStorage(data_dir / "blobs")


@pytest.fixture
def tenants(session_factory) -> tuple[str, str]:
    with session_scope(session_factory) as s:
        a, _ = create_tenant(s, name="tenant-a")
        b, _ = create_tenant(s, name="tenant-b")
        return a.id, b.id


@pytest.fixture
def trainer_settings(db_url: str, data_dir: Path, tiny_checkpoint: Path) -> Settings:
    """Embedded-broker settings for in-process tests; heartbeats fast, staleness short."""
    return Settings(data_dir=data_dir, database_url=db_url, model=str(tiny_checkpoint), job_heartbeat_s=0.2,
                    job_stale_after_s=3.0, tenant_max_running_jobs=2)


def _redis_client():
    import redis

    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)


@pytest.fixture
def redis_url() -> str:
    """Redis db 15, flushed before and after; started (no persistence) if it is down."""
    import redis

    client = _redis_client()
    try:
        client.ping()
    except redis.ConnectionError:
        if shutil.which("redis-server") is None:
            missing("Redis is not running at 127.0.0.1:6379 and redis-server is not installed")
        os.makedirs("/var/lib/redis", exist_ok=True)
        os.makedirs("/var/log/redis", exist_ok=True)
        subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
                        "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
                        "--logfile", "/var/log/redis/ci.log"], check=True)
        for _ in range(50):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        else:
            missing("could not start Redis")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


class WorkerProcess:
    """``python -m promptfleet.trainer.worker_main`` in its own process, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "promptfleet.trainer.worker_main", "--hostname", name,
                                      "--loglevel", "INFO"], env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, the job row keeps saying 'running'."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


@pytest.fixture
def worker_factory(tmp_path: Path, redis_url: str, trainer_settings: Settings):
    """start(name, **env) -> WorkerProcess against Redis and the test database; all stopped at the end."""
    started: list[WorkerProcess] = []
    env = {
        "PROMPTFLEET_DATABASE_URL": trainer_settings.resolved_database_url(),
        "PROMPTFLEET_DATA_DIR": str(trainer_settings.data_dir),
        "PROMPTFLEET_BROKER_URL": redis_url,
        "PROMPTFLEET_MODEL": trainer_settings.model,
        "PROMPTFLEET_JOB_HEARTBEAT_S": str(trainer_settings.job_heartbeat_s),
        "PROMPTFLEET_JOB_STALE_AFTER_S": str(trainer_settings.job_stale_after_s),
        "PROMPTFLEET_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
    }

    def start(name: str, **extra_env: str) -> WorkerProcess:
        worker = WorkerProcess({**env, **extra_env}, tmp_path / f"{name}.log", f"{name}@test")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()




@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory) -> Path:
    """A seeded random GQA Llama (3 layers, d=96, 6 query / 2 KV heads)."""
    from promptfleet.platform.random_checkpoint import make_random_llama_checkpoint

    return make_random_llama_checkpoint(tmp_path_factory.mktemp("llama-train"), shape="llama-small-test", seed=8,
                                        scale=6.0, num_hidden_layers=3, hidden_size=96, num_attention_heads=6,
                                        num_key_value_heads=2, intermediate_size=192)


@pytest.fixture
def prompt_learning_model() -> Callable[[Path, str | None], object]:
    """``make(checkpoint, method)``: the trainer's backbone, wrapped by ``method`` (None: bare)
    with 5 virtual tokens, its prompt encoder shifted by seeded noise so the adapter matters."""
    from promptfleet.trainer.backbone import load_backbone, load_tokenizer
    from promptfleet.trainer.methods import wrap

    def make(checkpoint: Path, method: str | None):
        model = load_backbone(checkpoint)
        if method is not None:
            model = wrap(model, method, num_virtual_tokens=5, init="random", init_text=None,
                         tokenizer=load_tokenizer(checkpoint), seed=1, encoder_hidden_size=32).eval()
            with torch.no_grad():  # weights a test can see
                for p in model.prompt_encoder.parameters():
                    p.add_(torch.randn_like(p) * 0.5)
        return model.eval()

    return make

"""Upload -> serve -> download and train -> serve through the HTTP API on both blob
backends (a directory; a bucket on moto_server), with a second replica that has its own
empty data dir and shares only the database and the blob store; then S3 taken away
mid-run: 503 storage_unavailable (never a 500, nothing half-written), and back with
nothing lost."""
from __future__ import annotations

import asyncio
import io
import json
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as st_load

from promptfleet.api import create_app
from promptfleet.platform.adapter import load_adapter_dir
from promptfleet.platform.config import EngineConfig
from promptfleet.platform.engine import Engine
from promptfleet.platform.sampling import SamplingParams
from promptfleet.settings import Settings

ADMIN = "pf-admin-storage-test"
PROMPT = "apple river:"
GREEDY = {"max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[Engine]:
    eng = Engine.from_pretrained(tiny_checkpoint, EngineConfig(max_batch_size=8))
    yield eng
    eng.stop()


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f.name)
    return buf.getvalue()


class Replicas:
    """API replicas sharing one SQLite database file and one blob URL, each with its own
    (empty) data dir."""

    def __init__(self, root: Path, checkpoint: Path, engine: Engine, blob_url: str) -> None:
        self.root, self.checkpoint, self.engine, self.blob_url = root, checkpoint, engine, blob_url
        self.db_url = f"sqlite:///{root / 'shared.db'}"
        self.stack = ExitStack()

    def start(self, name: str) -> TestClient:
        settings = Settings(data_dir=self.root / name, database_url=self.db_url, blob_url=self.blob_url,
                            model=str(self.checkpoint), model_id="gpt2", admin_key=ADMIN, embedded_worker=False,
                            max_tokens_limit=16)
        return self.stack.enter_context(TestClient(create_app(settings, engine=self.engine),
                                                   raise_server_exceptions=False))


@pytest.fixture
def replicas(tmp_path, tiny_checkpoint, engine, blob_url) -> Iterator[Replicas]:
    r = Replicas(tmp_path, tiny_checkpoint, engine, blob_url)
    with r.stack:
        yield r


def _tenant(client: TestClient) -> dict[str, str]:
    r = client.post("/admin/tenants", json={"name": f"t-{uuid.uuid4().hex[:8]}"},
                    headers={"Authorization": f"Bearer {ADMIN}"})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def _complete(client: TestClient, headers: dict[str, str], model: str):
    return client.post("/v1/completions", headers=headers, json={"model": model, "prompt": PROMPT, **GREEDY})


def _reference(engine: Engine, adapter_dir: Path) -> str:
    prefix = engine.build_adapter(load_adapter_dir(adapter_dir), "reference")
    return asyncio.run(engine.complete(PROMPT, SamplingParams(max_tokens=6, temperature=0), prefix)).text


def test_upload_serve_download_and_train_serve_on_both_backends(replicas, prompt_adapter_dir, engine):
    a = replicas.start("replica-a")
    h = _tenant(a)
    r = a.post("/v1/adapters", data={"name": "shared"}, headers=h,
               files={"file": ("adapter.zip", _zip(prompt_adapter_dir), "application/zip")})
    assert r.status_code == 201, r.text
    expected = _reference(engine, prompt_adapter_dir)
    out = _complete(a, h, "shared")
    assert out.status_code == 200 and out.json()["choices"][0]["text"] == expected

    # replica B: empty data dir, same database and blob store; it never saw the adapter
    b = replicas.start("replica-b")
    out = _complete(b, h, "shared")
    assert out.status_code == 200, out.text
    assert out.json()["choices"][0]["text"] == expected
    store_b = b.app.state.pf.prefix_store
    if replicas.blob_url.startswith("s3://"):  # read A's built prefix, no prefix forward on B
        assert (store_b.shared_hits, store_b.misses) == (1, 0)
    else:  # each host builds its own
        assert (store_b.shared_hits, store_b.misses) == (0, 1)
    dl = b.get("/v1/adapters/shared/download", headers=h)
    assert dl.status_code == 200
    with zipfile.ZipFile(io.BytesIO(dl.content)) as zf:
        got = st_load(zf.read("adapter_model.safetensors"))["prompt_embeddings"]
    want = st_load((prompt_adapter_dir / "adapter_model.safetensors").read_bytes())["prompt_embeddings"]
    assert torch.equal(got, want)

    # train -> serve: a dataset uploaded through B, trained by a worker that has only the
    # settings (its own data dir), served by A and B
    data = "".join(json.dumps({"prompt": f"w{i}:", "completion": " fleet"}) + "\n" for i in range(8)).encode()
    ds = b.post("/v1/datasets", files={"file": ("train.jsonl", data, "application/jsonl")}, headers=h)
    assert ds.status_code == 201, ds.text
    job = b.post("/v1/jobs", headers=h, json={"adapter_name": "learned", "dataset_id": ds.json()["id"],
                                              "max_steps": 2, "batch_size": 4, "num_virtual_tokens": 4})
    assert job.status_code == 202, job.text
    from promptfleet.trainer.runner import WorkerContext, run_job

    worker_settings = Settings(data_dir=replicas.root / "worker", database_url=replicas.db_url,
                               blob_url=replicas.blob_url, model=str(replicas.checkpoint))
    result = run_job(WorkerContext(worker_settings), job.json()["id"], task_id=None, worker="test-worker")
    assert result["status"] == "succeeded", result
    for client in (a, b):
        out = _complete(client, h, "learned")
        assert out.status_code == 200, out.text
    if replicas.blob_url.startswith("s3://"):  # nothing a replica needs lives only on a disk
        assert not (replicas.root / "worker" / "blobs").exists()


def test_s3_outage_is_503_then_recovery_with_nothing_lost(tmp_path, tiny_checkpoint, engine, s3_bucket, s3_proxy,
                                                           prompt_adapter_dir, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")  # one retry: the outage answers in about a second
    replicas = Replicas(tmp_path, tiny_checkpoint, engine, f"s3://{s3_bucket}/pf")
    with replicas.stack:
        a = replicas.start("a")
        h = _tenant(a)
        archive = _zip(prompt_adapter_dir)
        assert a.post("/v1/adapters", data={"name": "before"}, headers=h,
                      files={"file": ("a.zip", archive, "application/zip")}).status_code == 201
        warm = _complete(a, h, "before")
        assert warm.status_code == 200
        before = a.get("/v1/adapters/before/download", headers=h).content

        s3_proxy.down()
        up = a.post("/v1/adapters", data={"name": "during"}, headers=h,
                    files={"file": ("a.zip", archive, "application/zip")})
        assert up.status_code == 503, up.text
        assert up.json()["error"]["code"] == "storage_unavailable" and up.headers["Retry-After"]
        ds = a.post("/v1/datasets", headers=h,
                    files={"file": ("t.jsonl", b'{"prompt": "a", "completion": "b"}\n', "application/jsonl")})
        assert ds.status_code == 503 and ds.json()["error"]["code"] == "storage_unavailable"
        assert [m["name"] for m in a.get("/v1/adapters", headers=h).json()["data"]] == ["before"]  # no row
        assert a.get("/v1/datasets", headers=h).json()["data"] == []
        assert _complete(a, h, "before").json()["choices"] == warm.json()["choices"]  # warm here: still served
        cold = replicas.start("b")  # never saw it: needs the store
        out = _complete(cold, h, "before")
        assert out.status_code == 503 and out.json()["error"]["code"] == "storage_unavailable"
        dl = a.get("/v1/adapters/before/download", headers=h)
        assert dl.status_code == 503 and dl.json()["error"]["code"] == "storage_unavailable"

        s3_proxy.up()
        assert a.post("/v1/adapters", data={"name": "during"}, headers=h,
                      files={"file": ("a.zip", archive, "application/zip")}).status_code == 201
        assert _complete(cold, h, "before").json()["choices"] == warm.json()["choices"]
        assert _complete(cold, h, "during").status_code == 200
        assert a.get("/v1/adapters/before/download", headers=h).content == before

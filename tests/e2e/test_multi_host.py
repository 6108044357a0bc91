"""Scale-out across hosts, on real processes: two ``promptfleet serve`` replicas (A, B) and
two ``promptfleet worker`` processes, each with its own EMPTY data dir, sharing one
PostgreSQL database, one Redis database and one S3 bucket (moto, reached through a TCP proxy
the test can take away). ``promptfleet.testing.fleet`` builds it.

* An adapter uploaded through A is served by B with PEFT's greedy tokens; B's warm list
  (``/admin/cache/adapters``, ``promptfleet_adapter_warm``) gains it, A's does not.
* A dataset uploaded through B trains on a worker host; A and B both serve the result, equal
  to PEFT on the adapter downloaded through the API.
* A deletion through A is a 404 on B within 2 s.
* S3 taken away: uploads and cold adapters are 503 ``storage_unavailable`` (never 500),
  warm adapters keep serving, a job accepted meanwhile waits; once the store is back
  everything works and every accepted job finishes.
* Replica A killed (SIGKILL) under load: the clients retry on B (as a load balancer does),
  nothing a client sent is lost, and every accepted training job finishes.

Nothing is ever written to a host's local blob directory. Order matters (module-scoped
fleet): A's kill is last.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from promptfleet.adapters.s3_local import TcpProxy
from promptfleet.client import zip_directory
from promptfleet.testing.archives import unzip_to
from promptfleet.testing.failover import Failover, FailoverLoad, Op
from promptfleet.testing.fleet import Fleet, FleetConfig
from promptfleet.testing.peft import PeftReference, make_peft_adapter
from promptfleet.testing.polling import wait_for
from promptfleet.testing.s3 import create_bucket, s3_endpoint  # noqa: F401 - the session moto_server
from promptfleet.testing.services import (REDIS_HOST, REDIS_PORT, PgDatabases, flush_redis, require_postgres,
                                          require_redis)

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

FLEET_REDIS_DB = 8  # e2e stacks use 9-13, the API limits tests 14, the trainer tests 15
MAX_TOKENS = 8
GREEDY = {"max_tokens": MAX_TOKENS, "temperature": 0}
TERMINAL = ("succeeded", "failed", "cancelled")
OPEN_LIMITS = {"rate_per_s": 1000.0, "rate_burst": 1000, "max_concurrent": 1000}
SHORT_JOB = {"num_virtual_tokens": 4, "batch_size": 4, "max_steps": 4, "learning_rate": 0.05}


@pytest.fixture(scope="module")
def fleet(tiny_checkpoint: Path, s3_endpoint: str, tmp_path_factory) -> Iterator[Fleet]:  # noqa: F811
    require_postgres()
    require_redis(FLEET_REDIS_DB)
    dbs = PgDatabases(prefix="pf_fleet")
    flush_redis(FLEET_REDIS_DB)
    target = urlparse(s3_endpoint)
    proxy = TcpProxy(target=(target.hostname, target.port)).up()
    redis_url = f"redis://{REDIS_HOST}:{REDIS_PORT}/{FLEET_REDIS_DB}"
    config = FleetConfig(checkpoint=tiny_checkpoint, database_url=dbs.create(), redis_url=redis_url,
                         blob_url=f"s3://{create_bucket(s3_endpoint)}/fleet", s3_endpoint=proxy.endpoint,
                         env={"PROMPTFLEET_LIMITS_REDIS_URL": redis_url, "PROMPTFLEET_TENANT_MAX_RUNNING_JOBS": "8",
                              "PROMPTFLEET_JOB_STORAGE_RETRY_S": "120"})
    fleet = Fleet(root=tmp_path_factory.mktemp("fleet"), config=config, s3=proxy)
    try:
        fleet.migrate()
        fleet.add_worker("w1")
        fleet.add_worker("w2")
        fleet.add_replica("a")
        fleet.add_replica("b")
        fleet.wait_ready()
        yield fleet
    finally:
        proxy.up()
        fleet.close()
        proxy.down()
        try:
            dbs.drop_all()
        finally:
            flush_redis(FLEET_REDIS_DB)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> PeftReference:
    return PeftReference(tiny_checkpoint)


def client(fleet: Fleet, replica: str, key: str) -> httpx.Client:
    return fleet.replicas[replica].client(key, timeout=60)


def upload(c: httpx.Client, name: str, archive: bytes) -> httpx.Response:
    return c.post("/v1/adapters", data={"name": name}, files={"file": ("a.zip", archive, "application/zip")})


def complete(c: httpx.Client, model: str, prompt: str) -> httpx.Response:
    return c.post("/v1/completions", json={"model": model, "prompt": prompt, **GREEDY})


def answer(r: httpx.Response) -> tuple[str, str]:
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"], choice["finish_reason"]


def warm_metric(fleet: Fleet, replica: str) -> set[str]:
    """Adapter sha256s in ``promptfleet_adapter_warm``; every sample's replica label is checked."""
    r = httpx.get(f"{fleet.replicas[replica].base_url}/metrics", timeout=30)
    assert r.status_code == 200, r.text
    warm, labels = set(), set()
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels.add(s.labels.get("replica"))
            if s.name == "promptfleet_adapter_warm":
                warm.add(s.labels["adapter_sha256"])
    assert labels == {replica}, labels
    return warm


def warm_refs(fleet: Fleet, replica: str, tenant_id: str) -> dict[str, list[str]]:
    """``sha256 -> [name@version, ...]`` of ``tenant_id``'s live versions warm on ``replica``."""
    return {e["sha256"]: [f"{v['name']}@{v['version']}" for v in e["versions"] if v["tenant_id"] == tenant_id]
            for e in fleet.warm(replica)}


def tenant(fleet: Fleet, prefix: str, via: str) -> tuple[str, str]:
    """``(tenant id, api key)`` of a new tenant created through replica ``via``."""
    r = httpx.post(f"{fleet.replicas[via].base_url}/admin/tenants", headers=fleet.admin_headers(), timeout=30,
                   json={"name": f"{prefix}-{uuid.uuid4().hex[:6]}", **OPEN_LIMITS})
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["api_key"]


def submit_job(c: httpx.Client, name: str, dataset_id: str, **params) -> str:
    r = c.post("/v1/jobs", json={"adapter_name": name, "dataset_id": dataset_id, **SHORT_JOB, **params})
    assert r.status_code == 202, r.text
    return r.json()["id"]


# --------------------------------------------------------------------------- (a) upload on A, serve on B
def test_adapter_uploaded_through_a_is_served_by_b_equal_to_peft(fleet, reference, tiny_checkpoint, tmp_path):
    tenant_id, key = tenant(fleet, "uploader", via="a")
    dirs = {"soft": make_peft_adapter(tiny_checkpoint, tmp_path / "soft", "prompt_tuning", 5, seed=31),
            "prefix": make_peft_adapter(tiny_checkpoint, tmp_path / "prefix", "prefix_tuning", 4, seed=32)}
    with client(fleet, "a", key) as a, client(fleet, "b", key) as b:
        sha = {}
        for name, path in dirs.items():
            r = upload(a, name, zip_directory(path))
            assert r.status_code == 201, r.text
            sha[name] = r.json()["sha256"]
        assert not set(sha.values()) & set(warm_refs(fleet, "b", tenant_id))  # B has never seen them
        for name, path in dirs.items():
            for prompt in ("Hello world", "The fleet"):
                assert answer(complete(b, name, prompt)) == reference.answer(path, prompt, MAX_TOKENS), (name, prompt)
        assert answer(complete(b, "gpt2", "Hello world")) == reference.answer(None, "Hello world", MAX_TOKENS)
    # routing observability: B now holds both warm, A (which only stored them) neither
    on_b = warm_refs(fleet, "b", tenant_id)
    assert {s: on_b.get(s) for s in sha.values()} == {sha["soft"]: ["soft@1"], sha["prefix"]: ["prefix@1"]}
    assert not set(sha.values()) & set(warm_refs(fleet, "a", tenant_id))
    assert set(sha.values()) <= warm_metric(fleet, "b") and not set(sha.values()) & warm_metric(fleet, "a")
    assert fleet.local_blob_files() == []


# --------------------------------------------------------------------------- (b) dataset on B, trained by a worker
def test_dataset_uploaded_through_b_trains_on_a_worker_and_both_replicas_serve_it(fleet, reference, jsonl, tmp_path):
    _, key = tenant(fleet, "trainer", via="b")
    with client(fleet, "a", key) as a, client(fleet, "b", key) as b:
        r = b.post("/v1/datasets", files={"file": ("d.jsonl", jsonl(16), "application/jsonl")})
        assert r.status_code == 201, r.text
        job_id = submit_job(b, "tuned", r.json()["id"], max_steps=6)
        done = fleet.wait_job(key, job_id, via="a", until=lambda j: j["status"] in TERMINAL, timeout=150,
                              what="the training job")
        assert (done["status"], done["adapter"], done["error"]) == ("succeeded", "tuned@1", None), done
        ran_on = [n for n, h in fleet.worker_hosts.items() if f"job {job_id}: attempt 1 started" in h.worker_logs()]
        assert len(ran_on) == 1, fleet.logs()  # one worker host trained it, from its own empty data dir
        r = a.get("/v1/adapters/tuned/download")
        assert r.status_code == 200, r.text
        adapter_dir = unzip_to(r.content, tmp_path / "tuned")
        for prompt in ("apple river:", "Hello world"):
            want = reference.answer(adapter_dir, prompt, MAX_TOKENS)
            assert answer(complete(a, "tuned", prompt)) == want and answer(complete(b, "tuned", prompt)) == want
    assert fleet.local_blob_files() == []


# --------------------------------------------------------------------------- (c) deletion on A, 404 on B
def test_deletion_through_a_is_a_404_on_b_within_2_s(fleet, tiny_checkpoint, tmp_path):
    _, key = tenant(fleet, "deleter", via="a")
    archive = zip_directory(make_peft_adapter(tiny_checkpoint, tmp_path / "doomed", "prompt_tuning", 3, seed=33))
    with client(fleet, "a", key) as a, client(fleet, "b", key) as b:
        assert upload(a, "doomed", archive).status_code == 201
        answer(complete(b, "doomed", "Hello world"))  # warm on B
        assert a.delete("/v1/adapters/doomed").status_code == 204
        t0 = time.monotonic()

        def gone_on_b():
            r = complete(b, "doomed", "Hello world")
            assert r.status_code in (200, 404), r.text
            return r if r.status_code == 404 else None

        r = wait_for(gone_on_b, timeout=2.0, interval=0.05, what="B to answer 404 for the deleted adapter")
        assert time.monotonic() - t0 < 2.0 and r.json()["error"]["code"] == "model_not_found"
        assert b.get("/v1/adapters/doomed").status_code == 404
        assert "doomed" not in {m["id"] for m in b.get("/v1/models").json()["data"]}


# --------------------------------------------------------------------------- (e) S3 away mid-run
def storage_unavailable(r: httpx.Response) -> bool:
    return (r.status_code == 503 and r.json()["error"]["code"] == "storage_unavailable"
            and "retry-after" in r.headers)


def test_store_outage_503s_warm_keeps_serving_and_nothing_accepted_is_lost(fleet, jsonl, tiny_checkpoint,
                                                                          tmp_path):
    _, key = tenant(fleet, "outage", via="a")
    archives = {n: zip_directory(make_peft_adapter(tiny_checkpoint, tmp_path / n, "prompt_tuning", 4, seed=s))
                for n, s in (("warm", 41), ("cold", 42), ("late", 43))}
    with client(fleet, "a", key) as a, client(fleet, "b", key) as b:
        for name in ("warm", "cold"):
            assert upload(a, name, archives[name]).status_code == 201
        warm_answer = answer(complete(b, "warm", "Hello world"))
        r = b.post("/v1/datasets", files={"file": ("d.jsonl", jsonl(16), "application/jsonl")})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
        before = submit_job(a, "before", dataset_id, max_steps=40)  # accepted before: any phase meets the outage

        fleet.s3.down()
        try:
            up = upload(a, "late", archives["late"])
            assert storage_unavailable(up), up.text
            assert "late" not in {x["name"] for x in a.get("/v1/adapters").json()["data"]}  # no row left behind
            r = b.post("/v1/datasets", files={"file": ("d.jsonl", jsonl(8), "application/jsonl")})
            assert storage_unavailable(r), r.text
            r = complete(b, "cold", "Hello world")  # never loaded on B: its blob and prefix are in the store
            assert storage_unavailable(r), r.text
            assert answer(complete(b, "warm", "Hello world")) == warm_answer  # warm keeps serving
            assert answer(complete(b, "warm", "The fleet"))[1] in ("length", "stop")
            assert answer(complete(a, "gpt2", "Hello world"))[1] in ("length", "stop")
            during = submit_job(b, "during", dataset_id)  # accepted: the database and broker are up
            job = fleet.wait_job(key, during, via="a", until=lambda j: j["status"] != "queued", timeout=60,
                                 what="a worker to claim the job during the outage")
            assert job["status"] == "running", job
            time.sleep(1.5)  # its dataset read keeps failing; the worker waits instead of failing the job
            job = a.get(f"/v1/jobs/{during}").json()
            assert (job["status"], job["step"]) == ("running", 0), job
        finally:
            fleet.s3.up()

        for job_id, name in ((before, "before"), (during, "during")):
            done = fleet.wait_job(key, job_id, via="b", until=lambda j: j["status"] in TERMINAL, timeout=150,
                                  what=f"job {name} to finish after the outage")
            assert (done["status"], done["adapter"], done["attempts"]) == ("succeeded", f"{name}@1", 1), done
            for c in (a, b):
                assert answer(complete(c, name, "apple river:"))[1] in ("length", "stop")
        assert answer(complete(b, "cold", "Hello world"))[1] in ("length", "stop")
        assert upload(a, "late", archives["late"]).status_code == 201
        assert answer(complete(b, "late", "Hello world"))[1] in ("length", "stop")
    assert fleet.local_blob_files() == []


# --------------------------------------------------------------------------- (d) SIGKILL of A under load
def test_replica_a_sigkilled_under_load_clients_retry_on_b_and_accepted_jobs_finish(fleet, jsonl, tiny_checkpoint,
                                                                                    tmp_path):
    _, key = tenant(fleet, "survivor", via="b")
    archive = zip_directory(make_peft_adapter(tiny_checkpoint, tmp_path / "steady", "prompt_tuning", 4, seed=51))
    with client(fleet, "b", key) as b:
        assert upload(b, "steady", archive).status_code == 201
        want = answer(complete(b, "steady", "Hello world"))
        r = b.post("/v1/datasets", files={"file": ("d.jsonl", jsonl(8), "application/jsonl")})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
    a_first = [fleet.replicas[n].base_url for n in ("a", "b")]
    b_first = a_first[::-1]
    wrong: list[str] = []
    uploads: list[int] = []
    jobs: list[str] = []

    def completion(lb: Failover) -> httpx.Response:
        r = lb.request("POST", "/v1/completions", json={"model": "steady", "prompt": "Hello world", **GREEDY})
        if r.status_code == 200 and answer(r) != want:
            wrong.append(r.text)
        return r

    def push(lb: Failover) -> httpx.Response:
        r = lb.request("POST", "/v1/adapters", data={"name": "live"},
                       files={"file": ("a.zip", archive, "application/zip")})
        if r.status_code == 201:
            uploads.append(r.json()["version"])
        return r

    def train(lb: Failover) -> httpx.Response:
        r = lb.request("POST", "/v1/jobs", json={"adapter_name": "nightly", "dataset_id": dataset_id, **SHORT_JOB,
                                                 "max_steps": 2})
        if r.status_code == 202:
            jobs.append(r.json()["id"])
        return r

    ops = [Op("complete", a_first, completion), Op("complete", a_first, completion),
           Op("complete", b_first, completion), Op("complete", b_first, completion),
           Op("upload", a_first, push, pause=0.2), Op("job", a_first, train, pause=0.7)]
    kinds = {op.kind for op in ops}
    load = FailoverLoad(ops, key).start()
    try:
        t0 = time.monotonic()
        wait_for(lambda: load.ok_after(t0) == kinds, timeout=120, interval=0.1, what="load on both replicas",
                 on_timeout=lambda: str(load.statuses()))
        fleet.replicas["a"].server.kill()  # SIGKILL: no shutdown handler, connections reset mid-answer
        killed = time.monotonic()
        wait_for(lambda: load.ok_after(killed + 1.0) == kinds, timeout=120, interval=0.1,
                 what="every kind of request to succeed on B after A died",
                 on_timeout=lambda: f"{load.statuses()}\n{fleet.logs()}")
    finally:
        load.stop()
    statuses = load.statuses()
    assert set(statuses) <= {("complete", 200), ("upload", 201), ("job", 202)}, statuses  # nothing refused or lost
    assert load.retries >= 1, "no client ever had to fail over: A was not killed under load"
    assert not wrong, wrong[:3]
    assert len(uploads) == len(set(uploads)) and len(jobs) >= 2
    with client(fleet, "b", key) as b:
        for job_id in jobs:
            done = fleet.wait_job(key, job_id, via="b", until=lambda j: j["status"] in TERMINAL, timeout=150,
                                  what=f"accepted job {job_id} to finish")
            assert done["status"] == "succeeded", done
        latest = b.get("/v1/adapters/live")
        assert latest.status_code == 200 and latest.json()["version"] >= max(uploads), latest.text
        for version in uploads:  # every upload answered 201 is there, whichever replica took it
            assert b.get(f"/v1/adapters/live@{version}").status_code == 200, version
        assert answer(complete(b, "nightly", "apple river:"))[1] in ("length", "stop")
    assert fleet.local_blob_files() == []

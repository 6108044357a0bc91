"""Faults, on real processes: one deployment (server + worker processes, PostgreSQL, Redis)
whose server reaches PostgreSQL through a TCP proxy the test controls.

* SIGKILL of the worker mid-training: a new worker finishes the job, one adapter version.
* SIGTERM + restart of the API process under load: clients see connection errors or 503
  meanwhile, never another error; afterwards everything works and nothing accepted (an
  adapter upload answered 201, a job answered 202) is lost.
* PostgreSQL unreachable for a few seconds: clear 503s with Retry-After (not 500s, not
  hangs), and the server recovers by itself.
* A blob corrupted on disk: that adapter answers a clear 500 ``storage_error`` naming the
  corruption; other adapters keep working; re-uploading the same archive repairs it.
"""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import httpx
import pytest

from promptfleet.client import zip_directory
from promptfleet.testing.client_threads import ClientThreads
from promptfleet.testing.peft import make_peft_adapter
from promptfleet.testing.polling import wait_for
from promptfleet.testing.sse import stream_completion

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.slow]

TERMINAL = ("succeeded", "failed", "cancelled")
GREEDY = {"max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def stack(stack_factory, pg_proxy):
    stack = stack_factory(proxy=pg_proxy)
    stack.start_worker("w1")
    stack.start_server()
    return stack


def live_worker(stack) -> None:
    if not any(w.alive for w in stack.workers):
        stack.start_worker(f"w{len(stack.workers) + 1}")


def upload(client: httpx.Client, name: str, archive: bytes) -> httpx.Response:
    return client.post("/v1/adapters", data={"name": name}, files={"file": ("a.zip", archive, "application/zip")})


def complete(client: httpx.Client, model: str, prompt: str = "Hello world") -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, **GREEDY})


# --------------------------------------------------------------------------- worker SIGKILL
def test_worker_sigkill_mid_training_then_a_new_worker_finishes_the_job_once(stack, jsonl):
    live_worker(stack)
    key = stack.new_tenant("trainer")
    with stack.client(key) as c:
        r = c.post("/v1/datasets", files={"file": ("d.jsonl", jsonl(16), "application/jsonl")})
        assert r.status_code == 201, r.text
        r = c.post("/v1/jobs", json={"adapter_name": "survivor", "dataset_id": r.json()["id"],
                                     "num_virtual_tokens": 4, "batch_size": 4, "epochs": 1000, "max_steps": 80,
                                     "learning_rate": 0.05})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
    running = stack.wait_job(key, job_id, until=lambda j: j["status"] == "running" and j["step"] >= 1, timeout=90,
                             interval=0.05, what="the job to be running")
    assert running["step"] < 80, "the job finished before the worker could be killed"
    for worker in stack.workers:
        worker.kill()  # SIGKILL: no shutdown handler, the row keeps saying "running"
    with stack.client(key) as c:
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
    stack.start_worker(f"w{len(stack.workers) + 1}")
    done = stack.wait_job(key, job_id, until=lambda j: j["status"] in TERMINAL, timeout=150,
                          what="the new worker to finish the job")
    assert done["status"] == "succeeded", (done, stack.logs())
    assert done["attempts"] == 2 and done["adapter"] == "survivor@1" and done["error"] is None
    assert done["step"] == done["total_steps"] == 80
    with stack.client(key) as c:
        assert [a["version"] for a in c.get("/v1/adapters").json()["data"] if a["name"] == "survivor"] == [1]
        assert c.get("/v1/adapters/survivor@1").status_code == 200
        assert c.get("/v1/adapters/survivor@2").status_code == 404  # exactly one version registered
        r = complete(c, "survivor")
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop"), r.text


# --------------------------------------------------------------------------- API restart under load
SUCCESS = (("complete", 200), ("stream", 200), ("upload", 201))


@dataclass
class Outcome:
    at: float
    kind: str
    status: int            # 0: transport error
    detail: str = ""
    complete: bool = True  # a 200 stream ended with exactly one [DONE] and one finish_reason


class Load(ClientThreads):
    """Background clients: completions (plain and streamed, adapter and base model), adapter
    uploads and job submissions, until ``stop()``. Every outcome is recorded."""

    def __init__(self, stack, keys: dict[str, str], archive: bytes, dataset_id: str) -> None:
        self.stack, self.keys, self.archive, self.dataset_id = stack, keys, archive, dataset_id
        self.outcomes: list[Outcome] = []
        self.uploaded: list[tuple[str, int, str]] = []   # (name, version, sha256) answered 201
        self.jobs: list[str] = []                         # job ids answered 202
        self._spawn((self._loop, (fn, n)) for n, fn in enumerate([self._complete, self._complete, self._complete,
                                                                  self._complete, self._upload, self._job]))

    def _record(self, o: Outcome) -> None:
        with self._lock:
            self.outcomes.append(o)

    def _loop(self, fn, n: int) -> None:
        i = 0
        with httpx.Client(base_url=self.stack.base_url, timeout=30) as client:
            while not self._stop.is_set():
                try:
                    fn(client, n, i)
                except httpx.HTTPError as exc:
                    self._record(Outcome(time.monotonic(), fn.__name__, 0, type(exc).__name__))
                    self._stop.wait(0.05)
                i += 1

    def _complete(self, client: httpx.Client, n: int, i: int) -> None:
        key = self.keys["a"] if n % 2 == 0 else self.keys["b"]
        model = "steady" if n % 2 == 0 else "gpt2"
        body = {"model": model, "prompt": f"request {n}-{i}", **GREEDY}
        if i % 2:
            s = stream_completion(client, key, body)
            complete = s.status != 200 or (s.done == 1 and len(s.finish_reasons) == 1 and not s.errors)
            self._record(Outcome(time.monotonic(), "stream", s.status, str(s.errors)[:200], complete))
        else:
            r = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            self._record(Outcome(time.monotonic(), "complete", r.status_code, r.text[:200] if r.status_code != 200
                                 else ""))

    def _upload(self, client: httpx.Client, n: int, i: int) -> None:
        r = client.post("/v1/adapters", data={"name": f"live-{i % 3}"}, headers={"Authorization": f"Bearer {self.keys['a']}"},
                        files={"file": ("a.zip", self.archive, "application/zip")})
        self._record(Outcome(time.monotonic(), "upload", r.status_code, r.text[:200] if r.status_code != 201 else ""))
        if r.status_code == 201:
            with self._lock:
                self.uploaded.append((r.json()["name"], r.json()["version"], r.json()["sha256"]))
        self._stop.wait(0.2)

    def _job(self, client: httpx.Client, n: int, i: int) -> None:
        r = client.post("/v1/jobs", headers={"Authorization": f"Bearer {self.keys['b']}"},
                        json={"adapter_name": "nightly", "dataset_id": self.dataset_id, "num_virtual_tokens": 2,
                              "batch_size": 8, "max_steps": 2})
        self._stop.wait(1.5)
        if r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs":
            return  # two jobs of this tenant are still active: the limit, not a fault
        self._record(Outcome(time.monotonic(), "job", r.status_code, r.text[:200] if r.status_code != 202 else ""))
        if r.status_code == 202:
            with self._lock:
                self.jobs.append(r.json()["id"])

    def succeeded(self, kind: str, status: int, after: float) -> bool:
        with self._lock:
            return any(o.kind == kind and o.status == status and o.at > after for o in self.outcomes)

    def wait_successes(self, *, after: float, what: str, logs) -> None:
        """Wait until a completion, a stream and an upload each succeeded after ``after``."""
        wait_for(lambda: all(self.succeeded(kind, ok, after) for kind, ok in SUCCESS), timeout=240, interval=0.2,
                 what=what, on_timeout=lambda: f"{Counter((o.kind, o.status) for o in self.outcomes)}\n{logs()}")



def test_api_restart_under_load_loses_nothing_accepted(stack, jsonl, tiny_checkpoint, tmp_path):
    live_worker(stack)
    limits = {"rate_per_s": 1000.0, "rate_burst": 1000, "max_concurrent": 1000}
    keys = {"a": stack.new_tenant("restart-a", **limits), "b": stack.new_tenant("restart-b", **limits)}
    archive = zip_directory(make_peft_adapter(tiny_checkpoint, tmp_path / "steady", "prompt_tuning", 4, seed=5))
    with stack.client(keys["a"]) as a, stack.client(keys["b"]) as b:
        assert upload(a, "steady", archive).status_code == 201
        before = {m: complete(a if m == "steady" else b, m).json()["choices"][0]["text"] for m in ("steady", "gpt2")}
        r = b.post("/v1/datasets", files={"file": ("d.jsonl", jsonl(8), "application/jsonl")})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
        r = b.post("/v1/jobs", json={"adapter_name": "finished", "dataset_id": dataset_id, "num_virtual_tokens": 2,
                                     "batch_size": 8, "max_steps": 2})
        assert r.status_code == 202, r.text
        finished_id = r.json()["id"]
    finished = stack.wait_job(keys["b"], finished_id, until=lambda j: j["status"] in TERMINAL, timeout=90)
    assert finished["status"] == "succeeded", finished

    load = Load(stack, keys, archive, dataset_id).start()
    try:
        # the load has succeeded at every kind of request before the restart ...
        load.wait_successes(after=0.0, what="a success of each kind before the restart", logs=stack.logs)
        old_pid = stack.server.pid
        stack.stop_server()          # SIGTERM: graceful; in-flight requests finish
        stopped_at = time.monotonic()
        stack.start_server()         # same port, same database and data dir
        ready_at = time.monotonic()
        assert stack.server.pid != old_pid
        # ... and again after it (however long a loaded machine takes), not after a fixed sleep
        load.wait_successes(after=ready_at, what="a success of each kind after the restart", logs=stack.logs)
    finally:
        load.stop()

    outcomes = load.outcomes
    statuses = Counter((o.kind, o.status) for o in outcomes)
    # during the restart: connection errors or 503; never another error status
    bad = [o for o in outcomes if o.status not in (0, 200, 201, 202, 503)]
    assert not bad, bad[:5]
    assert all(o.complete for o in outcomes), [o for o in outcomes if not o.complete][:5]
    assert any(o.status == 0 for o in outcomes if o.at >= stopped_at), statuses  # the outage was seen
    for kind, ok in SUCCESS:
        assert any(o.kind == kind and o.status == ok and o.at < stopped_at for o in outcomes), statuses
        assert any(o.kind == kind and o.status == ok and o.at > ready_at for o in outcomes), statuses
    assert "Traceback" not in stack.server.log()

    # nothing accepted is lost: every adapter version answered 201 is there, same bytes, and serves
    with stack.client(keys["a"]) as a, stack.client(keys["b"]) as b:
        assert load.uploaded, statuses
        for name, version, sha in load.uploaded:
            r = a.get(f"/v1/adapters/{name}@{version}")
            assert r.status_code == 200 and r.json()["sha256"] == sha, (name, version, r.text)
        names = {n for n, _, _ in load.uploaded}
        for name in names:
            assert complete(a, name).status_code == 200
        listed = {x["name"]: x["version"] for x in a.get("/v1/adapters").json()["data"]}
        for name in names:
            assert listed[name] == max(v for n, v, _ in load.uploaded if n == name)
        # the finished job and its adapter are intact; greedy answers did not change
        job = b.get(f"/v1/jobs/{finished_id}").json()
        assert (job["status"], job["adapter"]) == ("succeeded", "finished@1"), job
        assert complete(b, "finished").status_code == 200
        assert complete(a, "steady").json()["choices"][0]["text"] == before["steady"]
        assert complete(b, "gpt2").json()["choices"][0]["text"] == before["gpt2"]
    # every job answered 202 still exists and runs to completion
    assert load.jobs, statuses
    for job_id in load.jobs:
        done = stack.wait_job(keys["b"], job_id, until=lambda j: j["status"] in TERMINAL, timeout=90,
                              what=f"accepted job {job_id}")
        assert done["status"] == "succeeded", done


# --------------------------------------------------------------------------- PostgreSQL outage
def test_postgres_outage_gives_503_then_recovers_without_restart(stack, pg_proxy, tiny_checkpoint, tmp_path):
    key = stack.new_tenant("outage")
    archive = zip_directory(make_peft_adapter(tiny_checkpoint, tmp_path / "pt", "prompt_tuning", 3, seed=8))
    pid = stack.server.pid
    auth = {"Authorization": f"Bearer {key}"}
    requests = [
        ("POST", "/v1/completions", dict(json={"model": "gpt2", "prompt": "Hi", **GREEDY})),
        ("POST", "/v1/completions", dict(json={"model": "pt", "prompt": "Hi", "stream": True, **GREEDY})),
        ("GET", "/v1/models", {}),
        ("GET", "/v1/adapters", {}),
        ("GET", "/v1/adapters/pt", {}),
        ("POST", "/v1/adapters", dict(data={"name": "during"}, files={"file": ("a.zip", archive, "application/zip")})),
        ("GET", "/v1/datasets", {}),
        ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef", {}),
    ]
    with httpx.Client(base_url=stack.base_url, headers=auth, timeout=30) as c:
        assert upload(c, "pt", archive).status_code == 201
        assert complete(c, "pt").status_code == 200
        pg_proxy.down()
        try:
            down_at = time.monotonic()
            rounds = 0
            while rounds < 2 or time.monotonic() - down_at < 4:   # a few seconds of outage, every endpoint
                for method, path, kwargs in requests:
                    t0 = time.monotonic()
                    r = c.request(method, path, **kwargs)
                    took = time.monotonic() - t0
                    assert r.status_code == 503, (method, path, r.status_code, r.text)
                    assert took < 10, f"{method} {path} took {took:.1f} s during the outage"
                    err = r.json()["error"]
                    assert err["code"] == "database_unavailable" and err["type"] == "server_overloaded", err
                    assert "database" in err["message"] and int(r.headers["retry-after"]) >= 1
                r = c.post("/admin/tenants", json={"name": "nope"}, headers=stack.admin_headers())
                assert r.status_code == 503, r.text
                assert c.get("/healthz").status_code == 200          # the process is alive
                assert c.get("/readyz").status_code == 503           # ... but not ready
                rounds += 1
        finally:
            pg_proxy.up()
        # recovers by itself: same process, no restart
        wait_for(lambda: complete(c, "gpt2").status_code == 200, timeout=30, interval=0.5,
                     what="the server to recover")
        assert c.get("/readyz").status_code == 200
        assert complete(c, "pt").status_code == 200
        assert upload(c, "after", archive).status_code == 201
        assert {a["name"] for a in c.get("/v1/adapters").json()["data"]} == {"pt", "after"}  # nothing half-stored
    assert stack.server.pid == pid and stack.server.alive
    log = stack.server.log()
    assert "database unavailable" in log and "unhandled error" not in log


# --------------------------------------------------------------------------- corrupted blob
def test_corrupted_blob_is_a_clear_error_for_that_adapter_only(stack, tiny_checkpoint, tmp_path):
    key = stack.new_tenant("corrupt")
    bad_archive = zip_directory(make_peft_adapter(tiny_checkpoint, tmp_path / "bad", "prompt_tuning", 4, seed=31))
    good_archive = zip_directory(make_peft_adapter(tiny_checkpoint, tmp_path / "good", "prefix_tuning", 4, seed=32))
    prefixes = stack.data_dir / "prefixes"

    def prefix_files() -> set:
        return {p for p in prefixes.rglob("*.safetensors")}

    with stack.client(key) as c:
        r = upload(c, "bad", bad_archive)
        assert r.status_code == 201, r.text
        bad_sha = r.json()["sha256"]
        assert upload(c, "good", good_archive).status_code == 201
        known = prefix_files()
        r = complete(c, "bad")
        assert r.status_code == 200, r.text
        bad_text = r.json()["choices"][0]["text"]
        bad_prefix = prefix_files() - known        # the built KV prefix of "bad", on the disk tier
        assert len(bad_prefix) == 1, bad_prefix
        good_text = complete(c, "good").json()["choices"][0]["text"]
        base_text = complete(c, "gpt2").json()["choices"][0]["text"]

    blob = stack.data_dir / "blobs" / bad_sha[:2] / bad_sha[2:]
    data = bytearray(blob.read_bytes())
    for at in (len(data) // 2, len(data) - 10):
        data[at] ^= 0xFF
    blob.write_bytes(bytes(data))
    bad_prefix.pop().unlink()
    stack.restart_server()                          # empty device cache: the blob is read again

    with stack.client(key) as c:
        for stream in (False, True):
            r = c.post("/v1/completions", json={"model": "bad", "prompt": "Hello world", "stream": stream, **GREEDY})
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert err["type"] == "server_error" and err["code"] == "storage_error", err
            assert "corrupt" in err["message"] and "bad@1" in err["message"], err
        r = c.get("/v1/adapters/bad/download")
        assert r.status_code == 500 and "corrupt" in r.json()["error"]["message"], r.text
        assert c.get("/v1/adapters/bad").status_code == 200                      # metadata is intact
        # the others keep working, with the same answers
        assert complete(c, "good").json()["choices"][0]["text"] == good_text
        assert complete(c, "gpt2").json()["choices"][0]["text"] == base_text
        # re-uploading the same archive stores the blob again (same sha256): repaired
        r = upload(c, "bad", bad_archive)
        assert r.status_code == 201 and r.json()["sha256"] == bad_sha and r.json()["version"] == 2, r.text
        r = complete(c, "bad@1")
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == bad_text, r.text
    log = stack.server.log()
    assert "corrupt" in log

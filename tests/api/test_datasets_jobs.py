"""Datasets and training jobs over HTTP: uploads and refusals, submission, status, cancel,
isolation between tenants -- and one job trained end to end by the embedded worker and
then served by name, without a restart."""
from __future__ import annotations

import json
import time

import pytest

from promptfleet.testing import api_error as _err
from promptfleet.testing.api_app import api_settings, running_api


def jsonl(n: int = 8, completion: str = " the fleet sails") -> bytes:
    words = ["apple", "river", "stone", "cloud", "seven", "green"]
    return "".join(json.dumps({"prompt": f"{words[i % 6]} {words[(i * 5) % 6]}:", "completion": completion}) + "\n"
                   for i in range(n)).encode()


def upload_dataset(api, headers, data: bytes):
    return api.client.post("/v1/datasets", files={"file": ("train.jsonl", data, "application/jsonl")},
                           headers=headers)


def test_dataset_upload_get_and_refusals(make_api, db_kind):
    api = make_api(db=db_kind, max_dataset_mb=1)
    _, h = api.new_tenant()
    r = upload_dataset(api, h, jsonl(8))
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["num_examples"] == 8 and ds["id"] and ds["num_tokens"] > 8
    assert api.client.get(f"/v1/datasets/{ds['id']}", headers=h).json() == ds
    assert [d["id"] for d in api.client.get("/v1/datasets", headers=h).json()["data"]] == [ds["id"]]

    bad = jsonl(2) + b'{"prompt": "x", "completion": 3}\n'
    err = _err(upload_dataset(api, h, bad), 400, "invalid_dataset")
    assert "line 3" in err["message"] and "completion" in err["message"]
    assert "line 1" in _err(upload_dataset(api, h, b""), 400)["message"]
    assert "line 2" in _err(upload_dataset(api, h, jsonl(1) + b"{not json\n"), 400)["message"]
    err = _err(upload_dataset(api, h, b"x" * (2 << 20)), 413, "request_too_large")
    assert "max_dataset_mb" in err["message"]
    _err(api.client.post("/v1/datasets", headers=h), 400)
    assert len(api.client.get("/v1/datasets", headers=h).json()["data"]) == 1


def test_jobs_submit_status_cancel_and_isolation(make_api, db_kind):
    api = make_api(db=db_kind, tenant_max_running_jobs=2)
    _, alice = api.new_tenant("alice")
    _, bob = api.new_tenant("bob")
    ds = upload_dataset(api, alice, jsonl()).json()["id"]

    r = api.client.post("/v1/jobs", json={"adapter_name": "trained", "dataset_id": ds, "max_steps": 2}, headers=alice)
    assert r.status_code == 202, r.text
    assert set(r.json()) == {"id", "status"} and r.json()["status"] == "queued"
    assert r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    job_id = r.json()["id"]

    job = api.client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert {"id", "status", "progress", "step", "total_steps", "metrics", "adapter", "error"} <= set(job)
    assert job["status"] == "queued" and job["adapter_name"] == "trained" and job["method"] == "prompt_tuning"
    assert [j["id"] for j in api.client.get("/v1/jobs", headers=alice).json()["data"]] == [job_id]
    assert api.client.get("/v1/jobs?status=queued", headers=alice).json()["data"][0]["id"] == job_id
    _err(api.client.get("/v1/jobs?status=bogus", headers=alice), 400)

    # bob sees none of it
    _err(api.client.get(f"/v1/datasets/{ds}", headers=bob), 404, "dataset_not_found")
    _err(api.client.get(f"/v1/jobs/{job_id}", headers=bob), 404, "job_not_found")
    _err(api.client.post(f"/v1/jobs/{job_id}/cancel", headers=bob), 404, "job_not_found")
    _err(api.client.post("/v1/jobs", json={"adapter_name": "x", "dataset_id": ds}, headers=bob), 404,
         "dataset_not_found")
    assert api.client.get("/v1/jobs", headers=bob).json()["data"] == []
    _err(api.client.get("/v1/jobs/nope%00", headers=alice), 404)

    # the per-tenant limit of active jobs
    assert api.client.post("/v1/jobs", json={"adapter_name": "t2", "dataset_id": ds}, headers=alice).status_code == 202
    r = api.client.post("/v1/jobs", json={"adapter_name": "t3", "dataset_id": ds}, headers=alice)
    _err(r, 429, "too_many_jobs")
    assert int(r.headers["retry-after"]) > 0

    r = api.client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=alice).status_code == 202  # idempotent
    assert api.client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "cancelled"


@pytest.mark.parametrize("body, where", [
    ({"dataset_id": "x"}, "adapter_name"), ({"adapter_name": "a"}, "dataset_id"),
    ({"adapter_name": "a", "dataset_id": "x", "method": "lora"}, "method"),
    ({"adapter_name": "a b", "dataset_id": "x"}, "adapter_name"),
    ({"adapter_name": "a", "dataset_id": "x", "epochs": 0}, "epochs"),
    ({"adapter_name": "a", "dataset_id": "x", "surprise": 1}, "surprise"),
])
def test_bad_job_bodies_are_400(api, body, where):
    _, h = api.new_tenant()
    assert where in _err(api.client.post("/v1/jobs", json=body, headers=h), 400, "invalid_parameters")["message"]


class _BrokerDown:
    """A Celery app whose broker refuses every message."""

    def send_task(self, *args, **kwargs):
        raise ConnectionError("broker unreachable")


def test_broker_failure_is_503_and_a_failed_job_cannot_be_cancelled(make_api, small_checkpoint, tmp_path,
                                                                       api_engine):
    settings = api_settings(tmp_path / "broken", small_checkpoint)
    with running_api(settings, engine=api_engine, celery_app=_BrokerDown()) as api:
        _, h = api.new_tenant()
        ds = upload_dataset(api, h, jsonl()).json()["id"]
        r = api.client.post("/v1/jobs", json={"adapter_name": "a", "dataset_id": ds}, headers=h)
        err = _err(r, 503, "enqueue_failed")
        assert "broker unreachable" in err["message"]
        [job] = api.client.get("/v1/jobs", headers=h).json()["data"]
        assert job["status"] == "failed"
        _err(api.client.post(f"/v1/jobs/{job['id']}/cancel", headers=h), 409, "job_not_cancellable")


def test_trained_adapter_is_served_without_a_restart(make_api):
    """The whole data flow: dataset -> job -> embedded Celery worker trains with PEFT ->
    new adapter version registered -> the next request by name uses it."""
    api = make_api(embedded_worker=True, job_heartbeat_s=0.2)
    assert api.state.worker is not None and api.state.worker.alive
    _, h = api.new_tenant()
    ds = upload_dataset(api, h, jsonl(8)).json()["id"]
    versions = []
    for seed in (0, 1):
        r = api.client.post("/v1/jobs", headers=h, json={
            "adapter_name": "learned", "dataset_id": ds, "max_steps": 2, "batch_size": 4, "num_virtual_tokens": 4,
            "seed": seed})
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 180  # the first job waits for the niced trainer's one-time imports
        while (job := api.client.get(f"/v1/jobs/{r.json()['id']}", headers=h).json())["status"] in ("queued",
                                                                                                       "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "succeeded", job
        assert job["adapter"] == f"learned@{seed + 1}" and job["progress"] == 1.0
        versions.append(job["adapter"])
        out = api.client.post("/v1/completions", headers=h, json={
            "model": "learned", "prompt": "apple river:", "max_tokens": 4, "temperature": 0})
        assert out.status_code == 200, out.text
        assert api.client.get("/v1/adapters/learned", headers=h).json()["version"] == seed + 1
    models = [m["id"] for m in api.client.get("/v1/models", headers=h).json()["data"]]
    assert "learned" in models

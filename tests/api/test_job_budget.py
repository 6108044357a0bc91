"""``POST /v1/jobs`` refuses a job over the example-pass budgets with a 403 that names the
numbers and the setting; a job within them is accepted."""
from __future__ import annotations

import json

from promptfleet.testing import api_error as _err


def _dataset(api, headers, n: int) -> str:
    data = "".join(json.dumps({"prompt": f"p{i}:", "completion": " yes"}) + "\n" for i in range(n)).encode()
    r = api.client.post("/v1/datasets", files={"file": ("train.jsonl", data, "application/jsonl")}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_jobs_over_the_training_budgets_are_403(make_api, db_kind):
    api = make_api(db=db_kind, job_max_train_examples=30, tenant_train_examples_per_day=50,
                   tenant_max_running_jobs=10)
    _, alice = api.new_tenant("alice")
    ds = _dataset(api, alice, 10)
    err = _err(api.client.post("/v1/jobs", json={"adapter_name": "big", "dataset_id": ds, "epochs": 4},
                               headers=alice), 403, "training_budget_exceeded")
    assert err["message"] == ("this job would train 4 epochs x 10 examples = 40 example-passes, over the per-job "
                              "budget of 30 (PROMPTFLEET_JOB_MAX_TRAIN_EXAMPLES)")
    ok = api.client.post("/v1/jobs", json={"adapter_name": "a", "dataset_id": ds, "epochs": 3}, headers=alice)
    assert ok.status_code == 202, ok.text
    err = _err(api.client.post("/v1/jobs", json={"adapter_name": "b", "dataset_id": ds, "epochs": 3},
                               headers=alice), 403, "training_budget_exceeded")
    assert "daily budget of 50 (PROMPTFLEET_TENANT_TRAIN_EXAMPLES_PER_DAY)" in err["message"]
    assert "with the 30 of this tenant's jobs from the last 24 h that makes 60" in err["message"]
    assert api.client.post("/v1/jobs", json={"adapter_name": "c", "dataset_id": ds, "epochs": 2},
                           headers=alice).status_code == 202  # 30 + 20 fits
    assert len(api.client.get("/v1/jobs", headers=alice).json()["data"]) == 2

"""Cancel a running job from the job view: the API reports it cancelled and the page says so;
the job carries the form's choices and the server's defaults for what was left empty."""
from __future__ import annotations

import time
from pathlib import Path

from playwright.sync_api import Page, expect

from promptfleet.trainer.methods import DEFAULT_NUM_VIRTUAL_TOKENS


def test_cancel_a_running_job(page: Page, console, tmp_path: Path):
    key = console.new_tenant()
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(console.jsonl_lines(16)) + "\n")
    with console.http(key) as http:
        r = http.post("/v1/datasets", files={"file": ("train.jsonl", data.read_bytes())})
        assert r.status_code == 201, r.text
        dataset_id = r.json()["id"]
    page.goto(console.url)
    console.sign_in(page, key)
    view = console.open_view(page, "Training jobs")
    expect(view.get_by_label("Dataset", exact=True).locator("option")).to_have_count(1)
    view.get_by_label("Adapter name").fill("long")
    view.get_by_label("Epochs", exact=True).fill("1000")
    view.get_by_label("Batch size", exact=True).fill("1")
    view.get_by_label("Initialisation").select_option("random")
    view.get_by_label("Validation dataset").select_option(dataset_id)
    view.get_by_role("button", name="Start training").click()
    status = view.locator("#job-status")
    expect(status).to_have_text("running", timeout=120_000)
    view.get_by_role("button", name="Cancel job").click()
    expect(status).to_have_text("cancelled", timeout=60_000)
    expect(view.get_by_role("button", name="Cancel job")).to_be_disabled()
    job_id = view.locator("#job-detail-h").text_content().split()[1].rstrip(":")
    with console.http(key) as http:
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "cancelled" and job["adapter"] is None
        # what the form sent: its choices, and the server's defaults for the fields left empty
        assert job["params"]["init"] == "random" and job["params"]["validation_dataset_id"] == dataset_id
        assert job["params"]["epochs"] == 1000 and job["params"]["num_virtual_tokens"] == DEFAULT_NUM_VIRTUAL_TOKENS
        assert job["total_steps"] is None or job["step"] < job["total_steps"]  # stopped before the end
        assert http.get("/v1/adapters/long").status_code == 404
    t0 = time.monotonic()
    expect(view.locator(f"#job-table tr[data-id='{job_id}'] td").nth(1)).to_have_text("cancelled")
    assert time.monotonic() - t0 < 10

"""The whole tenant flow in Chromium: sign in, upload an adapter, upload a dataset (with its
preview), train an adapter while its curves gain points, see the job succeed, then the base
model and the new adapter side by side in the playground, streamed; and the usage view.
References are the API's own answers over plain HTTP (httpx), never the page's."""
from __future__ import annotations

import json
import time
from pathlib import Path

from playwright.sync_api import Page, expect

from promptfleet.client import zip_directory
from promptfleet.testing.peft import make_peft_adapter

N_EXAMPLES = 24


def _points(page: Page, chart: str) -> int:
    return int(page.locator(f"#{chart}").get_attribute("data-points") or 0)


def _stream_pieces(http, body: dict) -> int:
    """How many SSE chunks with text the API streams for ``body``."""
    pieces = 0
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                pieces += sum(1 for c in json.loads(line[6:])["choices"] if c["text"])
    return pieces


def _dismiss_messages(page: Page) -> None:
    """Close every message by its own button (the screenshots show the view, not the log)."""
    buttons = page.get_by_role("button", name="Dismiss message")
    while buttons.count():
        buttons.first.click()


def test_sign_in_upload_train_watch_and_compare(page: Page, console, tiny_checkpoint: Path, tmp_path: Path):
    key, view = console.new_tenant_signed_in(page)
    expect(view).to_be_visible()
    assert key not in page.content()  # the key is in sessionStorage only, not in the document
    assert page.evaluate("sessionStorage.getItem('promptfleet.key')") == key
    assert page.get_by_label("API key", exact=True).input_value() == ""

    # -- upload an adapter by the file picker
    archive = tmp_path / "hand-made.zip"
    archive.write_bytes(zip_directory(make_peft_adapter(tiny_checkpoint, tmp_path / "peft", "prompt_tuning", 4, 7)))
    view.get_by_label("Adapter name").fill("hand-made")
    view.get_by_label("Archive (zip or tar.gz of a PEFT folder)").set_input_files(archive)
    view.get_by_role("button", name="Upload adapter").click()
    row = page.locator("#adapter-table tbody tr[data-name='hand-made']")
    expect(row).to_be_visible()
    with console.http(key) as http:
        served = http.get("/v1/adapters/hand-made").json()
    expect(row.locator("td").nth(1)).to_have_text(str(served["version"]))
    expect(row.locator("td").nth(2)).to_have_text(served["peft_type"])
    expect(row.locator("td").nth(3)).to_have_text(str(served["num_virtual_tokens"]))
    with page.expect_download() as download:
        row.get_by_role("button", name="Download hand-made").click()
    with console.http(key) as http:
        assert Path(download.value.path()).read_bytes() == http.get("/v1/adapters/hand-made/download").content

    # -- upload a dataset: the preview shows the file's first rows before it is sent
    lines = console.jsonl_lines(N_EXAMPLES)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    view = console.open_view(page, "Datasets")
    view.get_by_label("JSONL file").set_input_files(data)
    preview = page.locator("#preview-table tbody tr")
    expect(preview).to_have_count(5)
    for i in range(5):
        line = json.loads(lines[i])
        expect(preview.nth(i).locator("td").nth(1)).to_have_text(line["prompt"])
        expect(preview.nth(i).locator("td").nth(2)).to_have_text(line["completion"].strip())
    view.get_by_role("button", name="Upload dataset").click()
    with console.http(key) as http:
        expect(page.locator("#dataset-table tbody tr[data-id]")).to_have_count(1)
        [dataset] = http.get("/v1/datasets").json()["data"]
    assert dataset["num_examples"] == N_EXAMPLES
    expect(page.locator(f"#dataset-table tr[data-id='{dataset['id']}'] td").nth(1)).to_have_text(str(N_EXAMPLES))

    # -- a training job; the curves gain points while it runs
    view = console.open_view(page, "Training jobs")
    expect(view.get_by_label("Epochs")).to_have_attribute("placeholder", "default: 4")  # the server's schema default
    view.get_by_label("Adapter name").fill("trained")
    view.get_by_label("Dataset", exact=True).select_option(dataset["id"])
    for label, value in (("Virtual tokens", "4"), ("Epochs", "12"), ("Batch size", "1"),
                         ("Validation fraction", "0.25"), ("Learning rate", "0.3")):
        view.get_by_label(label, exact=True).fill(value)
    view.get_by_role("button", name="Start training").click()
    status = page.locator("#job-status")
    expect(status).to_be_visible()
    seen: list[tuple[str, int, int]] = []  # (status, loss points, epoch points) as the page showed them
    deadline = time.monotonic() + 180  # the first job waits for the trainer process's one-time imports
    while True:
        state = status.text_content().split(" ")[0]
        seen.append((state, _points(page, "chart-loss"), _points(page, "chart-epochs")))
        if state in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, seen[-5:]
        page.wait_for_timeout(100)
    assert state == "succeeded", page.locator("#job-error").text_content()
    job_id = page.locator("#job-detail-h").text_content().split()[1].rstrip(":")
    with console.http(key) as http:
        job = http.get(f"/v1/jobs/{job_id}").json()
    loss, epochs = job["metrics"]["loss"], job["metrics"]["epochs"]
    assert len(epochs) == 12 and "zero_shot" in job["metrics"]
    final = (len(loss), len(epochs) + 1)  # the epoch chart starts with the zero-shot point
    assert seen[-1][1:] == final, (seen[-1], final)
    running = {(lp, ep) for s, lp, ep in seen if s == "running" and (lp, ep) != (0, 0)}
    assert any(0 < lp < final[0] for lp, _ in running), f"the loss curve never showed a partial run: {seen}"
    assert len({lp for s, lp, _ in seen}) >= 3, f"the loss curve did not grow in steps: {seen}"
    expect(page.locator("#job-progress")).to_have_attribute("value", "1")
    expect(status).to_have_text(f"succeeded — adapter {job['adapter']}")
    accuracy = page.locator("#epoch-table tbody tr").last.locator("td").nth(3)
    expect(accuracy).to_have_text(f"{epochs[-1]['val_accuracy'] * 100:.1f} %")
    _dismiss_messages(page)
    page.screenshot(path=str(console.shots / "jobs.png"), full_page=True)

    # -- the playground: base model vs the trained adapter, streamed side by side
    view = console.open_view(page, "Playground")
    prompt = "apple river:"
    view.get_by_label("Prompt").fill(prompt)
    view.get_by_label("Model 1").select_option("gpt2")
    view.get_by_label("Model 2").select_option("trained")
    view.get_by_label("Max tokens").fill("12")
    view.get_by_label("Temperature").fill("0")
    view.get_by_role("button", name="Run").click()
    columns = page.locator("#play-outputs article")
    expect(columns).to_have_count(2)
    for i in range(2):
        expect(columns.nth(i)).to_have_attribute("data-state", "done", timeout=60_000)
    with console.http(key) as http:
        for i, model in enumerate(("gpt2", "trained")):
            body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            reference = r.json()["choices"][0]
            expect(columns.nth(i).locator("pre")).to_have_text(reference["text"], use_inner_text=False)
            expect(columns.nth(i).locator(".meta")).to_contain_text(f"finish reason {reference['finish_reason']}")
            # streamed: the page drew as many pieces as the server's stream sends
            assert int(columns.nth(i).get_attribute("data-chunks")) == _stream_pieces(http, body), model
    assert int(columns.nth(0).get_attribute("data-chunks")) >= 2  # the base model's 12 tokens came piece by piece
    _dismiss_messages(page)
    page.screenshot(path=str(console.shots / "playground.png"), full_page=True)

    # -- usage: three completions per model (the page's stream and the two references), from the server's counters
    console.open_view(page, "Usage")
    for model in ("gpt2", "trained"):
        expect(page.locator(f"#usage-table tr[data-model='{model}'] td").nth(1)).to_have_text("3")

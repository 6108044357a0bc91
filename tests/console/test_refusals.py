"""Refusals in the browser: each shows the API's own message (fetched over plain HTTP as
the reference) and changes nothing: a bad key, a hostile adapter archive, a malformed
dataset, and a job the API refuses."""
from __future__ import annotations

from pathlib import Path

import httpx
from playwright.sync_api import Page, expect

from promptfleet.testing.archives import dir_files, zip_bytes
from promptfleet.testing.peft import make_peft_adapter


def _api_message(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["message"]


def test_a_bad_key_is_refused_with_the_servers_message(page: Page, console):
    page.goto(console.url)
    console.sign_in(page, "pf-not-a-key")
    message = _api_message(httpx.get(f"{console.server.base_url}/v1/models",
                                     headers={"Authorization": "Bearer pf-not-a-key"}), 401)
    expect(console.error(page)).to_have_text(f"sign-in failed: {message} (HTTP 401)")
    expect(page.get_by_role("navigation", name="Views")).to_be_hidden()
    expect(console.view(page, "Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0
    # a tenant key is not an admin key either
    key = console.new_tenant()
    console.sign_in(page, key, kind="Admin")
    message = _api_message(httpx.get(f"{console.server.base_url}/admin/tenants",
                                     headers={"Authorization": f"Bearer {key}"}), 401)
    expect(console.error(page)).to_have_text(f"sign-in failed: {message} (HTTP 401)")
    assert "pf-not-a-key" not in page.content() and key not in page.content()
    page.screenshot(path=str(console.shots / "bad-key.png"))


def test_hostile_adapter_and_malformed_dataset_show_the_servers_reason(page: Page, console, tiny_checkpoint: Path,
                                                                       tmp_path: Path):
    key, view = console.new_tenant_signed_in(page)
    expect(view).to_be_visible()

    # a PEFT folder plus a member that climbs out of the extraction dir
    files = dir_files(make_peft_adapter(tiny_checkpoint, tmp_path / "peft", "prompt_tuning", 4, 3))
    hostile = tmp_path / "hostile.zip"
    hostile.write_bytes(zip_bytes({**files, "../escape.txt": b"out"}))
    view.get_by_label("Adapter name").fill("hostile")
    view.get_by_label("Archive (zip or tar.gz of a PEFT folder)").set_input_files(hostile)
    view.get_by_role("button", name="Upload adapter").click()
    with console.http(key) as http:
        message = _api_message(http.post("/v1/adapters", data={"name": "hostile"},
                                         files={"file": ("hostile.zip", hostile.read_bytes())}), 400)
        assert "path traversal" in message
        expect(console.error(page)).to_have_text(f"adapter upload failed: {message} (HTTP 400)")
        assert http.get("/v1/adapters").json()["data"] == []  # nothing registered
    expect(view.locator("#adapter-table tbody")).to_have_text("No adapters yet.")

    # a dataset whose third line is not JSON: the server names the line
    view = console.open_view(page, "Datasets")
    bad = tmp_path / "bad.jsonl"
    lines = console.jsonl_lines(4)
    lines[2] = '{"prompt": "cut off'
    bad.write_text("\n".join(lines) + "\n")
    view.get_by_label("JSONL file").set_input_files(bad)
    expect(view.locator("#preview-table tbody tr").nth(2).locator("td").nth(2)).to_have_text("(not JSON)")
    view.get_by_role("button", name="Upload dataset").click()
    with console.http(key) as http:
        message = _api_message(http.post("/v1/datasets", files={"file": ("bad.jsonl", bad.read_bytes())}), 400)
        assert "line 3" in message
        expect(console.error(page)).to_have_text(f"dataset upload failed: {message} (HTTP 400)")
        assert http.get("/v1/datasets").json()["data"] == []
    page.screenshot(path=str(console.shots / "refused-dataset.png"), full_page=True)

    # a job on another tenant's dataset: the API's 404, shown, and no job
    other = console.new_tenant("other")
    small = {"file": ("t.jsonl", "\n".join(console.jsonl_lines(4)))}
    with console.http(other) as http:
        theirs = http.post("/v1/datasets", files=small).json()["id"]
    with console.http(key) as http:
        assert http.post("/v1/datasets", files=small).status_code == 201
    view = console.open_view(page, "Training jobs")
    options = view.get_by_label("Dataset", exact=True).locator("option")
    expect(options).to_have_count(1)  # the view's own refresh is done
    options.first.evaluate("(o, id) => { o.value = id; }", theirs)
    view.get_by_label("Adapter name").fill("x")
    view.get_by_role("button", name="Start training").click()
    with console.http(key) as http:
        message = _api_message(http.post("/v1/jobs", json={"adapter_name": "x", "dataset_id": theirs}), 404)
        expect(console.error(page)).to_have_text(f"job refused: {message} (HTTP 404)")
        assert http.get("/v1/jobs").json()["data"] == []

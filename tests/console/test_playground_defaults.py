"""The playground with "each model's own defaults": only the prompt is sent, so an adapter
answers with the decoding defaults its version carries (issue 18); the reference is the
API's answer to the same request without sampling fields, and with those fields explicit."""
from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Page, expect

from promptfleet.client import zip_directory
from promptfleet.testing.peft import make_peft_adapter


def test_own_defaults_send_only_the_prompt(page: Page, console, tiny_checkpoint: Path, tmp_path: Path):
    key = console.new_tenant()
    archive = zip_directory(make_peft_adapter(tiny_checkpoint, tmp_path / "a", "prompt_tuning", 4, 5))
    with console.http(key) as http:
        assert http.post("/v1/adapters", data={"name": "terse"},
                         files={"file": ("a.zip", archive, "application/zip")}).status_code == 201
        r = http.patch("/v1/adapters/terse", json={"generation_defaults": {"temperature": 0, "max_tokens": 3}})
        assert r.status_code == 200, r.text
    page.goto(console.url)
    console.sign_in(page, key)
    view = console.open_view(page, "Playground")
    prompt = "apple river:"
    view.get_by_label("Prompt").fill(prompt)
    view.get_by_label("Model 1").select_option("terse")
    view.get_by_label("Max tokens").fill("12")  # not sent: the checkbox below leaves out every sampling field
    view.get_by_label("Each model's own defaults").check()
    view.get_by_role("button", name="Run").click()
    column = page.locator("#play-outputs article").first
    expect(column).to_have_attribute("data-state", "done", timeout=60_000)
    with console.http(key) as http:
        bare = http.post("/v1/completions", json={"model": "terse", "prompt": prompt}).json()
        explicit = http.post("/v1/completions", json={"model": "terse", "prompt": prompt, "max_tokens": 3,
                                                      "temperature": 0}).json()
    assert bare["usage"]["completion_tokens"] == 3 and bare["choices"][0]["text"] == explicit["choices"][0]["text"]
    expect(column.locator("pre")).to_have_text(bare["choices"][0]["text"], use_inner_text=False)
    expect(column.locator(".meta")).to_contain_text("finish reason length")

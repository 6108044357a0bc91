"""The adapters view beyond the happy path: an archive dropped on the drop zone, a second
version, the versions table, and delete behind its confirmation (Cancel keeps it)."""
from __future__ import annotations

import base64
from pathlib import Path

from playwright.sync_api import Page, expect

from promptfleet.client import zip_directory
from promptfleet.testing.peft import make_peft_adapter

DROP = """([name, b64]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, {type: "application/zip"}));
  const drop = new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true});
  document.querySelector("#adapter-drop").dispatchEvent(drop);
}"""


def test_drop_two_versions_list_them_and_delete_after_confirming(page: Page, console, tiny_checkpoint: Path,
                                                                 tmp_path: Path):
    key, view = console.new_tenant_signed_in(page)
    for n_virtual, seed in ((3, 1), (5, 2)):
        archive = zip_directory(make_peft_adapter(tiny_checkpoint, tmp_path / f"a{seed}", "prefix_tuning", n_virtual,
                                                  seed))
        page.evaluate(DROP, [f"v{seed}.zip", base64.b64encode(archive).decode()])
        assert view.get_by_label("Archive (zip or tar.gz of a PEFT folder)").evaluate("i => i.files[0].name") \
            == f"v{seed}.zip"
        view.get_by_label("Adapter name").fill("dropped")
        view.get_by_role("button", name="Upload adapter").click()
        expect(view.locator("#adapter-table tr[data-name='dropped'] td").nth(1)).to_have_text(str(seed))

    view.get_by_role("button", name="Versions of dropped").click()
    rows = view.locator("#version-table tbody tr")
    expect(rows).to_have_count(2)
    with console.http(key) as http:
        for row, version in zip((rows.nth(0), rows.nth(1)), (2, 1)):
            served = http.get(f"/v1/adapters/dropped@{version}").json()
            expect(row.locator("td").nth(0)).to_have_text(f"dropped@{version}")
            expect(row.locator("td").nth(1)).to_have_text(served["peft_type"])
            expect(row.locator("td").nth(2)).to_have_text(str(served["num_virtual_tokens"]))
        with page.expect_download() as download:
            rows.nth(1).get_by_role("button", name="Download dropped@1").click()
        assert Path(download.value.path()).read_bytes() == http.get("/v1/adapters/dropped@1/download").content

        view.get_by_role("button", name="Delete dropped").click()
        dialog = page.get_by_role("dialog")
        expect(dialog).to_contain_text('Delete adapter "dropped"')
        page.keyboard.press("Escape")  # the dialog closes without deleting
        expect(dialog).to_be_hidden()
        assert http.get("/v1/adapters/dropped").status_code == 200
        view.get_by_role("button", name="Delete dropped").click()
        dialog.get_by_role("button", name="Confirm").click()
        expect(view.locator("#adapter-table tbody")).to_have_text("No adapters yet.")
        assert http.get("/v1/adapters/dropped").status_code == 404

"""The admin views in Chromium: create a tenant with limits, see its key once (in a read-only
field, never in the markup), rotate it; each key checked against the API over plain HTTP."""
from __future__ import annotations

import uuid

import httpx
from playwright.sync_api import Page, expect

from promptfleet.testing.api_app import ADMIN_KEY


def _status(console, key: str) -> int:
    return httpx.get(f"{console.server.base_url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code


def test_admin_creates_a_tenant_with_limits_and_rotates_its_key(page: Page, console):
    page.goto(console.url)
    console.sign_in(page, ADMIN_KEY, kind="Admin")
    view = console.view(page, "Tenants")
    expect(view).to_be_visible()
    assert ADMIN_KEY not in page.content()

    name = f"acme-{uuid.uuid4().hex[:6]}"
    create = view.locator("#tenant-form")
    create.get_by_label("Tenant name").fill(name)
    create.get_by_label("Max concurrent requests").fill("3")
    create.get_by_label("Requests per second").fill("2.5")
    create.get_by_label("Burst").fill("7")
    view.get_by_role("button", name="Create tenant").click()
    key_field = view.get_by_label(f"New API key of {name} (shown once: copy it now)")
    expect(key_field).to_be_visible()
    first_key = key_field.input_value()
    assert _status(console, first_key) == 200  # the key shown works
    assert first_key not in page.content()     # a property of the input, not markup

    row = view.locator(f"#tenant-table tr[data-name='{name}'] td")
    listed = {t["name"]: t for t in httpx.get(f"{console.server.base_url}/admin/tenants?limit=100",
                                              headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]}[name]
    assert (listed["max_concurrent"], listed["rate_per_s"], listed["rate_burst"]) == (3, 2.5, 7)
    expect(row.nth(1)).to_have_text(listed["id"])
    expect(row.nth(2)).to_have_text("3")
    expect(row.nth(3)).to_have_text("2.5")
    expect(row.nth(4)).to_have_text("7")

    # change its limits: blank is the server's default; the API and the table agree, and the
    # new rate holds from the next request (1 per 100 s, burst 1: the second is refused)
    view.get_by_role("button", name=f"Edit limits of {name}").click()
    limits = view.get_by_role("form", name=f"Limits of {name} (blank: the server's default)")
    expect(limits).to_be_visible()
    expect(limits.get_by_label("Max concurrent requests")).to_have_value("3")
    limits.get_by_label("Max concurrent requests").fill("")
    limits.get_by_label("Requests per second").fill("0.01")
    limits.get_by_label("Burst").fill("1")
    limits.get_by_role("button", name="Save limits").click()
    expect(limits).to_be_hidden()
    expect(row.nth(2)).to_have_text("default")
    expect(row.nth(3)).to_have_text("0.01")
    saved = next(t for t in httpx.get(f"{console.server.base_url}/admin/tenants?limit=100",
                                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
                 if t["name"] == name)
    assert (saved["max_concurrent"], saved["rate_per_s"], saved["rate_burst"]) == (None, 0.01, 1)
    assert [_status(console, first_key) for _ in range(2)] == [200, 429]
    view.get_by_role("button", name=f"Edit limits of {name}").click()
    limits.get_by_label("Requests per second").fill("0")  # the API refuses (above 0): its message, nothing changed
    limits.get_by_role("button", name="Save limits").click()
    expect(console.error(page)).to_contain_text("limits refused:")
    again = next(t for t in httpx.get(f"{console.server.base_url}/admin/tenants?limit=100",
                                      headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"]
                 if t["name"] == name)
    assert again == saved
    limits.get_by_label("Requests per second").fill("")
    limits.get_by_label("Burst").fill("")
    limits.get_by_role("button", name="Save limits").click()
    expect(limits).to_be_hidden()

    # rotate: confirm in the dialog; the old key stops working, the new one works
    view.get_by_role("button", name=f"Rotate key of {name}").click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text(f"Rotate the API key of {name}?")
    dialog.get_by_role("button", name="Confirm").click()
    expect(key_field).not_to_have_value(first_key)
    second_key = key_field.input_value()
    assert _status(console, first_key) == 401 and _status(console, second_key) == 200

    # cancelling the dialog rotates nothing
    view.get_by_role("button", name=f"Rotate key of {name}").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()
    assert _status(console, second_key) == 200

    # a refused tenant: the API's message
    create.get_by_label("Tenant name").fill(name)
    view.get_by_role("button", name="Create tenant").click()
    r = httpx.post(f"{console.server.base_url}/admin/tenants", json={"name": name},
                   headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 409
    expect(console.error(page)).to_have_text(f"tenant refused: {r.json()['error']['message']} (HTTP 409)")

    view.get_by_role("button", name="Hide").click()
    expect(key_field).to_be_hidden()
    page.get_by_role("button", name="Sign out").click()
    expect(console.view(page, "Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0

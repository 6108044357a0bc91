"""Keyboard use and the two widths: sign in and move between views with the keyboard only;
at 390 px and at 1280 px no view is wider than the window (tables scroll inside their own
box); the page loads nothing from outside this server."""
from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from promptfleet.testing.api_app import ADMIN_KEY

TENANT_VIEWS = ["Adapters", "Datasets", "Training jobs", "Playground", "Usage"]


def _tab_to(page: Page, predicate: str, limit: int = 40) -> None:
    """Press Tab until ``predicate`` (JS, on document.activeElement as ``e``) holds."""
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate(f"(e => Boolean({predicate}))(document.activeElement)"):
            return
    raise AssertionError(f"Tab never reached {predicate}")


def _overflow(page: Page) -> int:
    return page.evaluate("document.documentElement.scrollWidth - window.innerWidth")


def test_keyboard_only_sign_in_and_navigation(page: Page, console):
    key = console.new_tenant()
    page.goto(console.url)
    _tab_to(page, "e.id === 'signin-key'")
    page.keyboard.type(key)
    page.keyboard.press("Enter")
    expect(console.view(page, "Adapters")).to_be_visible()
    for name in ("Datasets", "Playground"):
        _tab_to(page, f"e.tagName === 'BUTTON' && e.textContent === '{name}'")
        page.keyboard.press("Enter")
        expect(console.view(page, name)).to_be_visible()
    # the playground's controls are reachable and labelled
    _tab_to(page, "e.id === 'play-prompt'")
    assert page.evaluate("document.activeElement.labels[0].textContent") == "Prompt"


@pytest.mark.parametrize("width", [390, 1280])
def test_every_view_fits_the_width_and_loads_only_local_files(browser, console, width: int):
    context = browser.new_context(viewport={"width": width, "height": 844})
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    try:
        page.goto(console.url)
        assert _overflow(page) <= 0
        console.sign_in(page, console.new_tenant())
        for name in TENANT_VIEWS:
            view = console.open_view(page, name)
            filled = view.locator("select option") if name == "Playground" else view.locator("tbody tr")
            expect(filled.first).to_be_attached()  # the view has drawn what the API answered
            assert _overflow(page) <= 0, (width, name, _overflow(page))
            if name == "Training jobs" and width == 390:
                page.screenshot(path=str(console.shots / "jobs-390.png"), full_page=True)
        page.get_by_role("button", name="Sign out").click()
        console.sign_in(page, ADMIN_KEY, kind="Admin")
        expect(console.view(page, "Tenants").locator("tbody tr").first).to_be_attached()
        assert _overflow(page) <= 0
        # offline: every request went to this server (no CDN, no font service)
        outside = [u for u in requests if not u.startswith(console.server.base_url) and not u.startswith("data:")]
        assert outside == [], outside
        assert any(u.endswith("/console/static/vendor/uPlot.iife.min.js") for u in requests)
    finally:
        context.close()

"""Browser-test fixtures: one API server (uvicorn in a thread, embedded Celery worker, the
tiny random GPT-2) for this package (each test signs in as a tenant of its own), Debian's
Chromium driven by Playwright (also one for the package), and a fresh browser context per
test; screenshots go to the pytest tmp dir.

Chromium or Playwright missing: skipped with the reason, a failure under ``CI=true``
(``.ci/run`` installs Chromium)."""
from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from promptfleet.testing.api_app import ADMIN_KEY, api_settings
from promptfleet.testing.live_server import LiveServer, live_server
from promptfleet.testing.skips import missing

CHROMIUM = "/usr/bin/chromium"
WIDE = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
WORDS = ["apple", "river", "stone", "cloud", "seven", "green"]


@dataclass
class Console:
    server: LiveServer
    shots: Path

    @property
    def url(self) -> str:
        return f"{self.server.base_url}/console"

    def http(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.server.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    def new_tenant(self, prefix: str = "web") -> str:
        r = httpx.post(f"{self.server.base_url}/admin/tenants", json={"name": f"{prefix}-{uuid.uuid4().hex[:8]}"},
                       headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)
        assert r.status_code == 201, r.text
        return r.json()["api_key"]

    # -- steps every browser test takes
    @staticmethod
    def sign_in(page, key: str, kind: str = "Tenant") -> None:
        page.get_by_label("API key", exact=True).fill(key)
        page.get_by_label(kind, exact=True).check()
        page.get_by_role("button", name="Sign in").click()

    def new_tenant_signed_in(self, page):
        """A new tenant signed in on the console's first view (Adapters): ``(key, that view)``."""
        key = self.new_tenant()
        page.goto(self.url)
        self.sign_in(page, key)
        return key, self.view(page, "Adapters")

    @staticmethod
    def view(page, name: str):
        """The visible view (a labelled region) called ``name``; hidden views do not match."""
        return page.get_by_role("region", name=name, exact=True)

    @classmethod
    def open_view(cls, page, name: str):
        """Click ``name`` in the navigation; the view, once visible."""
        from playwright.sync_api import expect

        page.get_by_role("navigation", name="Views").get_by_role("button", name=name, exact=True).click()
        view = cls.view(page, name)
        expect(view).to_be_visible()
        return view

    @staticmethod
    def error(page):
        """The newest error message in the page's message area."""
        return page.locator("#flash .msg.error p").first

    @staticmethod
    def jsonl_lines(n: int) -> list[str]:
        """``n`` training examples: a two-word prompt and its first word as the completion."""
        return [json.dumps({"prompt": f"{WORDS[i % 6]} {WORDS[(i * 5) % 6]}:", "completion": f" {WORDS[i % 6]}"})
                for i in range(n)]


@pytest.fixture(scope="package")
def console(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    from promptfleet.api import create_app

    root = tmp_path_factory.mktemp("console")
    # no generation cache: a repeated greedy request is generated (and streamed) again, so the
    # page's stream and the tests' reference streams are both the engine's
    settings = api_settings(root / "data", tiny_checkpoint, embedded_worker=True, job_heartbeat_s=0.2,
                            generation_cache_enabled=False)
    with live_server(create_app(settings)) as server:
        yield Console(server=server, shots=tmp_path_factory.mktemp("console-screenshots"))


@pytest.fixture(scope="package")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[dev]')")
    if shutil.which(CHROMIUM) is None:
        missing(f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, console: Console):
    """A fresh context (own sessionStorage) at 1280 px; uncaught script errors are collected
    in ``page.js_errors`` and must stay empty."""
    context = browser.new_context(viewport=WIDE)
    page = context.new_page()
    page.js_errors = []
    page.on("pageerror", lambda e: page.js_errors.append(str(e)))
    yield page
    context.close()
    assert not page.js_errors, page.js_errors

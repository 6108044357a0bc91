"""Deployment defaults: beyond loopback the server refuses the development admin key (or
any short one) and an open /metrics; loopback accepts both (the demo and the tests)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from promptfleet.api import server
from promptfleet.api.server import UnsafeDeployment, check_deployment, is_loopback
from promptfleet.settings import Settings

STRONG = "k" * 32


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "localhost", "LOCALHOST", "::1", "[::1]",
                                  "::ffff:127.0.0.1"])
def test_loopback_addresses(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "192.168.1.2", "::ffff:10.0.0.1", "example.com",
                                  "localhost.evil.example", ""])
def test_other_addresses_are_not_loopback(host):
    assert not is_loopback(host)


def test_loopback_keeps_the_dev_key_and_an_open_metrics():
    check_deployment(Settings(admin_key="pf-admin-dev", metrics_key=""), "127.0.0.1")
    check_deployment(Settings(admin_key="", metrics_key=""), "::1")


@pytest.mark.parametrize("admin_key", ["pf-admin-dev", "", "short-key-15chr"])
def test_weak_admin_key_refused_beyond_loopback(admin_key):
    with pytest.raises(UnsafeDeployment, match="PROMPTFLEET_ADMIN_KEY"):
        check_deployment(Settings(admin_key=admin_key, metrics_key="m" * 20), "0.0.0.0")


def test_open_metrics_refused_beyond_loopback_unless_public():
    with pytest.raises(UnsafeDeployment, match="PROMPTFLEET_METRICS_KEY.*PROMPTFLEET_METRICS_PUBLIC"):
        check_deployment(Settings(admin_key=STRONG, metrics_key=""), "10.1.2.3")
    check_deployment(Settings(admin_key=STRONG, metrics_key="scrape"), "10.1.2.3")
    check_deployment(Settings(admin_key=STRONG, metrics_key="", metrics_public=True), "0.0.0.0")


def test_run_server_checks_before_building_anything(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("the app must not be built for an unsafe deployment")

    monkeypatch.setattr(server, "create_app", boom)
    with pytest.raises(UnsafeDeployment):
        server.run_server(Settings(admin_key="pf-admin-dev"), host="0.0.0.0", port=1)


def _serve(env_overrides: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTFLEET_")}
    env.update(env_overrides)
    return subprocess.run([sys.executable, "-m", "promptfleet.cli", "serve", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_serve_refuses_and_names_the_setting(tmp_path):
    out = _serve({"PROMPTFLEET_DATA_DIR": str(tmp_path)}, "--host", "0.0.0.0", "--model", str(tmp_path / "none"))
    assert out.returncode == 2, out.stderr
    assert "PROMPTFLEET_ADMIN_KEY" in out.stderr and "development default" in out.stderr
    out = _serve({"PROMPTFLEET_DATA_DIR": str(tmp_path), "PROMPTFLEET_ADMIN_KEY": STRONG},
                 "--host", "0.0.0.0", "--model", str(tmp_path / "none"))
    assert out.returncode == 2 and "PROMPTFLEET_METRICS_KEY" in out.stderr, out.stderr

"""Project-level checks: the README's commands, .ci/run, docker-compose and the CLI."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from promptfleet.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_has_demo_and_test_commands_and_ci_runs_the_test_one():
    demo, tests = _readme_commands()
    assert "promptfleet demo" in demo and "\n" not in demo
    assert "pytest" in tests and "\n" not in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "the README's test command must be the one .ci/run calls"


def test_compose_parses_and_names_every_setting():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"api", "worker", "postgres", "redis"} <= set(compose["services"])
    for svc in ("api", "postgres", "redis"):
        assert "healthcheck" in compose["services"][svc]
    named: set[str] = set()
    for svc in compose["services"].values():
        named |= set((svc.get("environment") or {}).keys())
    wanted = {f"PROMPTFLEET_{name.upper()}" for name in Settings.model_fields}
    assert not wanted - named, f"docker-compose.yml does not set {sorted(wanted - named)}"
    assert compose["services"]["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def test_cli_help_for_every_command():
    commands = ["serve", "worker", "db upgrade", "tenant create", "tenant list", "key rotate", "adapter push",
                "adapter list", "adapter pull", "dataset push", "job submit", "job watch", "job cancel", "bench",
                "demo", "gc"]
    for cmd in commands:
        out = subprocess.run([sys.executable, "-m", "promptfleet.cli", *cmd.split(), "--help"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (cmd, out.stderr)
        assert "Usage" in out.stdout


def test_cli_client_error_exit_code_and_message():
    out = subprocess.run([sys.executable, "-m", "promptfleet.cli", "adapter", "list", "--url",
                          "http://127.0.0.1:9", "--key", "pf-x"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cannot reach" in out.stderr
    out = subprocess.run([sys.executable, "-m", "promptfleet.cli", "adapter", "list", "--url",
                          "http://127.0.0.1:9"], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in __import__("os").environ.items() if k != "PROMPTFLEET_API_KEY"})
    assert out.returncode == 1 and "needs a tenant key" in out.stderr

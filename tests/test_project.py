"""Project-level checks: the README's commands, .ci/run, docker-compose and the CLI."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from promptfleet.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


STUB_PYTHON = """#!/bin/sh
# a stand-in for python: creates venvs (linking itself in), records every other call
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && ln -sf "$STUB" "$3/bin/python" && echo "$3" >> "$VENVS"; exit 0
fi
printf '%s' "$0" >> "$RECORD"; for a in "$@"; do printf '\\t%s' "$a" >> "$RECORD"; done; echo >> "$RECORD"
"""


def _ci_run_with_stubs(tmp_path: Path) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """Run .ci/run with python, pg_isready and redis-cli replaced by stubs: the python calls
    it made, in order, as (executable, argv), and the venvs it created."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    stub.write_text(STUB_PYTHON)
    for name in ("pg_isready", "redis-cli"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    record, venvs = tmp_path / "calls", tmp_path / "venvs"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB": str(stub), "RECORD": str(record), "VENVS": str(venvs),
           "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = [line.split("\t") for line in record.read_text().splitlines()]
    return [(c[0], c[1:]) for c in calls], venvs.read_text().split()


def test_ci_runs_exactly_the_readme_test_command_in_a_fresh_venv(tmp_path):
    demo, tests = _readme_commands()
    assert "promptfleet demo" in demo and "\n" not in demo and "\n" not in tests
    steps = [shlex.split(part) for part in tests.split("&&")]
    calls, venvs = _ci_run_with_stubs(tmp_path)
    assert [argv for _, argv in calls] == [step[1:] for step in steps]  # the same commands, in order
    assert all(step[0] == "python" for step in steps)
    assert len(venvs) == 1 and all(exe == f"{venvs[0]}/bin/python" for exe, _ in calls)  # inside the new venv
    assert steps[-1][1:3] == ["-m", "pytest"]


def test_readme_pip_lines_name_only_what_exists():
    """Every install in the README's test command names a local project with extras it
    declares, or one exact release of a package."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    _, tests = _readme_commands()
    installs = [shlex.split(part) for part in tests.split("&&") if "pip" in part]
    assert installs, tests
    for argv in installs:
        assert argv[:4] == ["python", "-m", "pip", "install"], argv
        targets = [a for a in argv[4:] if not a.startswith("-")]
        assert targets, argv
        for target in targets:
            local = re.fullmatch(r"(\.[^\[]*)(?:\[([\w,-]+)\])?", target)
            if local:
                assert (ROOT / local.group(1) / "pyproject.toml").is_file(), target
                assert set((local.group(2) or "").split(",")) - {""} <= set(extras), (target, sorted(extras))
            else:
                assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][0-9A-Za-z.]*", target), target


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


def test_compose_scales_out_behind_nginx_on_minio():
    """Two api replicas behind nginx (least connections over the api service, on the port the
    api serves, health-checked on /readyz), MinIO with the bucket PROMPTFLEET_BLOB_URL names."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    api, nginx = services["api"], services["nginx"]
    assert api["deploy"]["replicas"] >= 2 and "ports" not in api  # clients reach the replicas through nginx
    port = api["command"][api["command"].index("--port") + 1]
    assert f":{port}/readyz" in " ".join(api["healthcheck"]["test"])
    assert nginx["depends_on"]["api"]["condition"] == "service_healthy"
    mount = next(v for v in nginx["volumes"] if v.endswith(":/etc/nginx/nginx.conf:ro"))
    conf = (ROOT / mount.split(":")[0]).read_text()
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", conf, flags=re.S)
    assert upstream, "nginx.conf has no upstream block"
    assert "least_conn;" in upstream.group(2)
    assert re.search(rf"^\s*server\s+api:{port}\s", upstream.group(2), flags=re.M), "upstream is not the api service"
    assert f"proxy_pass http://{upstream.group(1)};" in conf
    assert any(p.split(":")[-1] == "8000" for p in nginx["ports"])
    # MinIO, and its init job creates the very bucket the api and workers use
    env = compose["x-promptfleet-env"]
    blob_url = re.fullmatch(r"\$\{PROMPTFLEET_BLOB_URL:-s3://([a-z0-9.-]+)/\w+\}", env["PROMPTFLEET_BLOB_URL"])
    assert blob_url, env["PROMPTFLEET_BLOB_URL"]
    bucket = blob_url.group(1)
    assert f"mc mb --ignore-existing local/{bucket}" in " ".join(services["minio-init"]["command"])
    assert "minio:9000" in env["AWS_ENDPOINT_URL"] and "healthcheck" in services["minio"]
    for svc in ("api", "worker"):
        assert services[svc]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert not any(v.endswith(":/data") for v in services[svc].get("volumes", []))  # /data is a cache


def test_cli_help_for_every_command():
    commands = ["serve", "worker", "db upgrade", "tenant create", "tenant list", "key rotate", "adapter push",
                "adapter list", "adapter pull", "dataset push", "job submit", "job watch", "job cancel", "bench",
                "demo", "gc", "kernels build"]
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

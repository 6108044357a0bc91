"""The load test (``scripts/load_test.py`` -> ``promptfleet.bench.load_bench``), short:
40 concurrent clients for ~10 s on the tiny checkpoint, 20 adapters over 2 tenants,
streamed and not, against its own ``promptfleet serve`` process on a fresh PostgreSQL
database. The full target (200 clients, 60 s, GPT-2-small shape) is the same script with
``--shape gpt2 --clients 200 --duration 60``.

Also: the script's checks catch what they claim to catch (a stream with two [DONE], no
finish_reason, an error event, a wrong answer), so a green run means something.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from promptfleet.bench import load_bench

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "load_test.py"


def test_short_load_run_is_correct_and_steady(postgres_db_url, tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--clients", "40", "--duration", "10", "--warmup", "2", "--adapters", "20",
           "--tenants", "2", "--prompts", "4", "--max-tokens", "12", "--shape", "tiny", "--database-url", postgres_db_url,
           "--keep", str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        _stop(proc, tmp_path / "run" / "server.pid")
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, (stdout, stderr[-3000:])          # ONE JSON line
    result = json.loads(lines[0])
    assert proc.returncode == 0 and result["ok"], (json.dumps(result, indent=1), stderr[-3000:])
    assert all(result["checks"].values()), result["checks"]
    req = result["requests"]
    assert req["issued"] == req["answered"] == req["ok"] == req["server_counted_200"] >= 150, req
    assert req["by_status"] == {"200": req["issued"]} and req["duplicate_ids"] == 0 and req["mismatches"] == 0
    assert 0 < req["streamed"] < req["issued"] and req["models_used"] == 21, req   # 20 adapters + the base model
    assert result["reference"]["distinct"] == 21 * 4
    assert result["latency_ms"]["p50"] > 0 and result["latency_ms"]["p99"] >= result["latency_ms"]["p50"]
    assert result["ttft_ms"]["p50"] is not None and result["throughput"]["completion_tokens_per_s"] > 0
    rss = result["server_rss_mb"]
    assert rss["idle"] and rss["warm"] and rss["end"] and rss["growth"] <= rss["limit"], rss


def _stop(proc: subprocess.Popen, server_pid_file: Path) -> None:
    """Whatever happened: SIGTERM the script (it stops its server), then SIGKILL both groups."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    if server_pid_file.exists():   # the script did not see its server exit
        try:
            pid = int(server_pid_file.read_text())
            if b"promptfleet.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():   # still that server
                os.killpg(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass


def _record(stream: bool = True) -> load_bench.Record:
    return load_bench.Record(index=0, model="m", stream=stream, status=200, latency=0.1)


def _chunk(text: str, finish: str | None = None, cid: str = "cmpl-1") -> str:
    return "data: " + json.dumps({"id": cid, "choices": [{"index": 0, "text": text, "finish_reason": finish}]})


USAGE = "data: " + json.dumps({"id": "cmpl-1", "choices": [], "usage": {"completion_tokens": 2}})


@pytest.mark.parametrize("lines, problem, mismatch", [
    ([_chunk("a"), _chunk("b", "length"), USAGE, "data: [DONE]"], None, False),
    ([_chunk("a"), _chunk("X", "length"), USAGE, "data: [DONE]"], None, True),
    ([_chunk("a"), _chunk("b", "length"), USAGE, "data: [DONE]", "data: [DONE]"], "2 [DONE] events", False),
    ([_chunk("a"), _chunk("b", "length"), USAGE], "0 [DONE] events", False),
    ([_chunk("a"), _chunk("b"), USAGE, "data: [DONE]"], "0 finish_reasons", True),
    ([_chunk("a", "stop"), _chunk("b", "length"), USAGE, "data: [DONE]"], "2 finish_reasons", True),
    ([_chunk("a"), _chunk("b", "length"), "data: [DONE]"], "0 usage chunks", False),
    ([_chunk("a"), _chunk("b", "length", cid="cmpl-2"), USAGE, "data: [DONE]"], "2 completion ids", False),
    ([_chunk("a"), 'data: {"error": {"message": "boom"}}', "data: [DONE]"], "error event", True),
])
def test_the_stream_checks_catch_what_they_claim(lines, problem, mismatch):
    rec = _record()
    load_bench._check_stream(lines, rec, ("ab", "length"), 0.0, [])
    if problem is None:
        assert rec.problems == []
    else:
        assert any(problem in p for p in rec.problems), rec.problems
    assert rec.mismatch is mismatch

"""``promptfleet demo --keep``: the server stays up until Ctrl-C, which returns control to
``run_demo`` (whose ``finally`` stops the server)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

from typer.testing import CliRunner

from promptfleet.cli import app
from promptfleet.demo import _serve_until_interrupted, _stop


def test_keep_waits_for_ctrl_c_and_leaves_the_server_to_be_stopped(capsys):
    server = subprocess.Popen(["sleep", "60"], start_new_session=True)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    try:
        timer.start()
        t0 = time.monotonic()
        _serve_until_interrupted("http://127.0.0.1:9", server)
        waited = time.monotonic() - t0
        assert 0.9 <= waited < 30 and server.poll() is None  # it waited for Ctrl-C, not for the server
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, old)
        _stop(server)
    assert "open http://127.0.0.1:9/console" in capsys.readouterr().err


def test_keep_returns_when_the_server_exits_by_itself(capsys):
    server = subprocess.Popen(["sh", "-c", "exit 3"], start_new_session=True)
    _serve_until_interrupted("http://127.0.0.1:9", server)
    assert "the server exited with 3" in capsys.readouterr().err


def test_the_cli_offers_keep():
    out = CliRunner().invoke(app, ["demo", "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0 and "--keep" in out.output

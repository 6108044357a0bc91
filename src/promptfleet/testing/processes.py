"""Real processes for end-to-end tests: each in its own session (process group), output
to a log file, stopped gracefully or killed as a group, never leaked."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def tail(text: str, n: int = 6000) -> str:
    """The last ``n`` characters of a log, for failure messages."""
    return text[-n:]


class Proc:
    """A subprocess in its own session (process group), stdout+stderr to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, name: str) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL to the whole group: no handler runs. Only while the process is ours
        (not yet reaped), so a recycled pid is never signalled."""
        if self.proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:  # pragma: no cover - the kernel owes us this one
                pass
        self._close_log()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``."""
        if self.alive:
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def _close_log(self) -> None:
        if not self._log.closed:
            self._log.close()


def python_env(extra: dict[str, str]) -> dict[str, str]:
    """This environment without PROMPTFLEET_* settings, quiet and offline, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTFLEET_")}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    env.update(extra)
    return env

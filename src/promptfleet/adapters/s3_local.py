"""A local S3-protocol server for tests and the storage bench, and a TCP proxy that can
take it away.

``start_moto_server`` runs ``moto_server -H 127.0.0.1 -p PORT`` (from ``moto[server]``,
an in-memory S3) as a subprocess and waits until it answers. Stopping moto loses its
objects, so an outage is simulated in front of it: ``TcpProxy.down()`` closes the
listening socket and every open connection (clients see "connection refused"), ``up()``
listens on the same port again, with everything stored still there.
"""
from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def moto_server_path() -> str | None:
    return shutil.which("moto_server")


@dataclass
class MotoServer:
    endpoint: str
    proc: subprocess.Popen | None = None  # None: not ours (an endpoint given from outside)
    log_path: Path | None = None

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1):
            return True
    except OSError as exc:  # an HTTP error status still means it is up
        return hasattr(exc, "code")


def start_moto_server(*, host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None,
                      timeout: float = 60.0) -> MotoServer:
    """Start ``moto_server`` on a free port; raise ``RuntimeError`` if it is not installed
    or does not answer within ``timeout`` seconds."""
    exe = moto_server_path()
    if exe is None:
        raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
    port = port or free_port(host)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen([exe, "-H", host, "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    server = MotoServer(endpoint=f"http://{host}:{port}", proc=proc, log_path=log_path)
    deadline = time.monotonic() + timeout
    while not _answers(server.endpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"moto_server did not start on {server.endpoint} (exit code {proc.poll()})")
        time.sleep(0.1)
    log.info("moto_server up at %s (pid %d)", server.endpoint, proc.pid)
    return server


@dataclass
class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; ``down()``/``up()`` cut and restore it."""

    target: tuple[str, int]
    port: int = field(default_factory=free_port)
    _listener: socket.socket | None = field(default=None, repr=False)
    _conns: set[socket.socket] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> "TcpProxy":
        with self._lock:
            if self._listener is not None:
                return self
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", self.port))
            sock.listen(64)
            self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), name="s3-proxy-accept", daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            sock, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        for s in ([sock] if sock else []) + list(conns):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            src.close()  # each direction closes its source: both sockets end closed
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

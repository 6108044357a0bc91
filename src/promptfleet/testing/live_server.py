"""An ASGI app under uvicorn on a free loopback port, in a thread of the test process,
for clients that need a real socket (the openai client, disconnects, schemathesis)."""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import uvicorn

from promptfleet.testing.polling import wait_for


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    app: Any
    base_url: str
    server: uvicorn.Server

    @property
    def state(self) -> Any:
        return self.app.state.pf


@contextmanager
def live_server(app: Any, *, start_timeout: float = 120.0) -> Iterator[LiveServer]:
    """Serve ``app`` (lifespan on) until the block ends; waits until uvicorn has started."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False,
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()

    def started() -> bool:
        if not thread.is_alive():
            raise AssertionError("uvicorn exited before it started")
        return server.started

    wait_for(started, timeout=start_timeout, interval=0.02, what="uvicorn to start")
    try:
        yield LiveServer(app=app, base_url=f"http://127.0.0.1:{port}", server=server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)

"""Size caps on requests: headers, bodies and uploaded files.

``HeaderLimitMiddleware`` answers 431 to a request whose header lines add up to more
than ``MAX_HEADER_BYTES`` (uvicorn's httptools parser takes a megabyte of headers).

``BodyLimitMiddleware`` (pure ASGI) refuses with 413 a body whose ``Content-Length`` is
over the route's cap before reading any of it, and stops a body without (or lying
about) its length as soon as the bytes received pass the cap -- the app's own response
is then replaced by the 413. ``read_upload`` applies the exact cap to one file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from collections.abc import Callable

from fastapi import UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from promptfleet.api.errors import error_body, too_large

MULTIPART_SLACK = 64 << 10  # multipart envelope and form fields around the file
CHUNK = 1 << 20
MAX_HEADER_BYTES = 32 << 10  # all header names and values together (nginx's default buffers: 4 x 8 KiB)


class _BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class BodyLimit:
    bytes: int
    what: str  # for the message, e.g. "the adapter upload limit of 64 MiB (max_upload_mb)"


def mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


async def send_error(send: Send, status: int, message: str, code: str) -> None:
    """An OpenAI-shaped JSON error sent straight from middleware (the app never ran), closing the connection."""
    body = json.dumps(error_body(message, status=status, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limit_for: Callable[[str, str], BodyLimit | None]) -> None:
        self.app = app
        self.limit_for = limit_for  # (method, path) -> the cap, or None for none

    async def _refuse(self, send: Send, limit: BodyLimit) -> None:
        await send_error(send, 413, f"request body is larger than {limit.what}", "request_too_large")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = self.limit_for(scope["method"], scope["path"])
        if cap is None:
            await self.app(scope, receive, send)
            return
        limit = cap.bytes
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                if declared is not None and declared > limit:
                    await self._refuse(send, cap)
                    return
        received = 0
        exceeded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # the app's answer to a cut body is replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self._refuse(send, cap)


class HeaderLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int = MAX_HEADER_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = sum(len(name) + len(value) for name, value in scope.get("headers", ()))
            if size > self.max_bytes:
                await send_error(send, 431, f"request headers total {size} bytes; the limit is "
                                            f"{self.max_bytes // 1024} KiB", "request_header_fields_too_large")
                return
        await self.app(scope, receive, send)


def read_upload(file: UploadFile, *, limit: int, what: str) -> bytes:
    """The whole file, read in chunks (blocking: call from a sync route); 413 as soon as
    it passes ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    while chunk := file.file.read(CHUNK):
        size += len(chunk)
        if size > limit:
            raise too_large(f"{what} is larger than the limit of {mib(limit)}")
        parts.append(chunk)
    return b"".join(parts)

"""A Server-Sent Events response that always watches for the client going away.

Starlette's ``StreamingResponse`` only listens for ``http.disconnect`` on ASGI spec
versions below 2.4 and never closes its iterator; this one listens on every server and
runs ``on_close`` (shielded from cancellation) however the stream ends, so a client
that disconnects cancels its generation and frees its engine slot at once.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], *, on_close: Callable[[bool], Awaitable[None]],
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(events, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})
        self._on_close = on_close
        self.completed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``on_close(completed)``: False when the client left (or sending failed) first."""
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    await self.stream_response(send)
                    self.completed = True
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        except OSError:
            pass
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    await aclose()
                await self._on_close(self.completed)


def sse_data(payload: str) -> str:
    return f"data: {payload}\n\n"

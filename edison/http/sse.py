"""Server-sent events with the client's disconnect watched on the ASGI `receive` channel.

Starlette's `StreamingResponse` notices a gone client only when a write fails (ASGI spec
2.4), and during a long prefill nothing is written: the model would keep computing for
the whole prompt. Here a task waits on `receive()` for `http.disconnect` from the first
byte on, so a disconnect is a cancel in every phase.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from starlette.types import Receive, Scope, Send

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def frame(data: Any, event: str | None = None) -> bytes:
    """One SSE event: named (Edison's own stream) or data-only (OpenAI's), JSON data."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def comment(text: str) -> bytes:
    """An SSE comment: clients skip it; it keeps a proxy from timing out a silent stream."""
    return f": {text}\n\n".encode()


async def watch_disconnect(receive: Receive, on_disconnect: Callable[[], None]) -> None:
    """Returns after calling `on_disconnect` once the client is gone."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class EventStream:
    """An ASGI response: writes `chunks` until they end or the client goes away."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        on_disconnect: Callable[[], None],
        headers: dict[str, str] | None = None,
        media_type: str = "text/event-stream",
    ) -> None:
        self.chunks = chunks
        self._on_disconnect = on_disconnect
        self.disconnected = False
        self.headers = {**SSE_HEADERS, **(headers or {}), "Content-Type": f"{media_type}; charset=utf-8"}

    def on_disconnect(self) -> None:
        if not self.disconnected:  # the watcher and a failed write may both report it
            self.disconnected = True
            self._on_disconnect()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                await watch_disconnect(receive, self.on_disconnect)
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await send({"type": "http.response.start", "status": 200, "headers": raw_headers})
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away mid-write
                self.on_disconnect()
            finally:
                aclose = getattr(self.chunks, "aclose", None)
                if aclose:
                    with anyio.CancelScope(shield=True):
                        await aclose()
            group.cancel_scope.cancel()

"""The one path between a route and the pool, for both APIs: the system-prompt policy, a
disconnect that cancels, and the events of a job read until its final one.

Starlette's `StreamingResponse` would notice a gone client only when a write fails; here a
stream's disconnect is watched on `receive()` from the first byte (sse.py), and a whole
(non-streaming) answer races its final event against `http.disconnect` the same way: an API
client that times out just closes the socket, and nothing else would stop the worker.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import anyio
from starlette.types import Receive

from edison.http.sse import watch_disconnect
from edison.pool import FINAL, Event, Models, Request
from edison.settings import ModeSettings

logger = logging.getLogger("edison")

Messages = tuple[dict[str, str], ...]


def with_system_prompt(mode: ModeSettings, messages: Messages) -> Messages:
    """The mode's system prompt goes first, unless the conversation brings its own."""
    if not mode.system_prompt or any(m["role"] == "system" for m in messages):
        return messages
    return ({"role": "system", "content": mode.system_prompt}, *messages)


def disconnect_cancels(pool: Models, request_id: str) -> Callable[[], None]:
    def on_disconnect() -> None:
        live = pool.requests.get(request_id)
        first = live is not None and live.cancel_at is None  # not already stopping (the page's Stop)
        if pool.cancel(request_id) and first:
            logger.info("Client disconnected for request %s", request_id)

    return on_disconnect


async def events(job: Request) -> AsyncIterator[Event]:
    """Every event of the job, the final one (Completed, Stopped or Failure) last."""
    while True:
        event = await job.events.get()
        yield event
        if isinstance(event, FINAL):
            return


async def final_event(job: Request, receive: Receive, on_disconnect: Callable[[], None]) -> Event | None:
    """The job's final event, or None if the client went away first (then `on_disconnect` ran)."""
    final: Event | None = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            await watch_disconnect(receive, on_disconnect)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        async for event in events(job):
            final = event
        group.cancel_scope.cancel()
    return final

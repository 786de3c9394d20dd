"""Edison's own routes: `/chat/stream`, `/chat/cancel`, `/health`, `/modes` (README "API");
the models' routes are in models.py.

The pool reaches them through lifespan state, never a module global.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edison.http.errors import answering, from_failure
from edison.http.jobs import disconnect_cancels, events, with_system_prompt
from edison.http.sse import EventStream, frame
from edison.http.validation import parse_cancel, parse_chat, read_json_object
from edison.pool import Completed, Event, Failure, Loading, Models, Queued, Stopped
from edison.pool import Request as PoolRequest
from edison.protocol import Progress, Token
from edison.settings import Settings

logger = logging.getLogger("edison")


def chat_routes() -> list[Route]:
    return [
        Route("/chat/stream", answering(chat_stream, openai=False), methods=["POST"]),
        Route("/chat/cancel", answering(chat_cancel, openai=False), methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/modes", modes, methods=["GET"]),
    ]


async def chat_stream(request: Request, request_id: str) -> Response:
    pool: Models = request.state.pool
    settings: Settings = request.state.settings
    data = await read_json_object(request, settings.server.max_body_bytes)
    chat = parse_chat(data, settings.modes, settings.default_mode, settings.debug.allow_wedge)
    mode = settings.modes[chat.mode]
    model = pool.entry(chat.model).name  # an unknown model is a 404 before anything starts
    messages = with_system_prompt(mode, (*chat.history, {"role": "user", "content": chat.message}))
    job = pool.submit(mode.sampling, request_id, messages=messages, wedge_s=chat.wedge_s, format=chat.format,
                      model=model, keep_alive=chat.keep_alive)
    logger.info("Streaming request %s (model %s, mode %s)", request_id, model, chat.mode)
    return EventStream(  # type: ignore[return-value]
        chat_events(job, chat.mode, model),
        on_disconnect=disconnect_cancels(pool, request_id),
        headers={"X-Request-ID": request_id},
    )


async def chat_events(job: PoolRequest, mode: str, model: str) -> AsyncIterator[bytes]:
    yield frame({"request_id": job.request_id, "model": model}, "init")
    async for event in events(job):
        if isinstance(event, Token):
            yield frame({"t": event.text}, "token")
        elif isinstance(event, Progress):
            yield frame({"phase": event.phase, "done": event.done, "total": event.total}, "progress")
        elif isinstance(event, Loading):
            yield frame({"phase": "loading", "model": event.model, "elapsed_s": event.elapsed_s}, "progress")
        elif isinstance(event, Queued):
            yield frame({"position": event.position}, "queued")
        else:
            yield frame(done_payload(event, mode), "done")


def done_payload(event: Event, mode: str) -> dict[str, Any]:
    if isinstance(event, (Completed, Stopped)):
        usage = {"prompt_tokens": event.usage.prompt_tokens, "completion_tokens": event.usage.completion_tokens,
                 "cached_tokens": event.usage.cached_tokens, "cached_from": event.usage.cached_from}
    if isinstance(event, Completed):
        return {"ok": True, "response": event.text, "mode_used": mode, "finish_reason": event.finish_reason, "usage": usage}
    if isinstance(event, Stopped):
        return {"ok": False, "stopped": True, "response": event.text, "mode_used": mode, "stopped_by": event.tier.value,
                "usage": usage}
    assert isinstance(event, Failure)
    return {"ok": False, "error": from_failure(event).message}


async def chat_cancel(request: Request, request_id: str) -> Response:
    pool: Models = request.state.pool
    data = await read_json_object(request, request.state.settings.server.max_body_bytes)
    target = parse_cancel(data)
    if pool.cancel(target):
        logger.info("Request %s cancelled by user", target)
        return JSONResponse({"status": "cancelled", "request_id": target})
    return JSONResponse({"status": "not_found", "request_id": target})


async def health(request: Request) -> Response:
    report = request.state.pool.health(verbose=request.query_params.get("verbose") in ("1", "true"))
    return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)


async def modes(request: Request) -> Response:
    settings: Settings = request.state.settings
    listed = [{"name": name, "description": mode.description} for name, mode in settings.modes.items()]
    return JSONResponse({"modes": listed, "default": settings.default_mode})

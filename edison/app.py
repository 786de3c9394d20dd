"""The HTTP contract: routes, validation, status codes and SSE framing (see README "API").

The pool reaches the routes through lifespan state, never a module global.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from edison.auth import ApiKeyMiddleware
from edison.messages import Done, Progress, Sampling, Token
from edison.metrics import metrics_endpoint
from edison.pool import Event, Failure, Pool, Queued, Stopped, Unavailable
from edison.pool import Request as PoolRequest
from edison.settings import REPO_ROOT, ModeSettings, Settings
from edison.sse import EventStream, sse
from edison.validation import BadRequest, parse_cancel, parse_chat, read_json_object

logger = logging.getLogger("edison")

WEB_DIR = REPO_ROOT / "web"


def sampling_for(mode: ModeSettings) -> Sampling:
    """A mode's sampling settings, as they travel to the worker."""
    return Sampling(**{f.name: getattr(mode, f.name) for f in dataclasses.fields(Sampling)})


def chat_messages(mode: ModeSettings, history: tuple[dict[str, str], ...], message: str) -> tuple[dict[str, str], ...]:
    system = ({"role": "system", "content": mode.system_prompt},) if mode.system_prompt else ()
    return (*system, *history, {"role": "user", "content": message})


def error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def submit(pool: Pool, request_id: str, **job: Any) -> PoolRequest | JSONResponse:
    """Hands a job to the pool, or answers why it cannot take one (503)."""
    try:
        return pool.submit(request_id=request_id, **job)
    except Unavailable as exc:
        return error(str(exc), 503)


def disconnect_cancels(pool: Pool, request_id: str) -> Any:
    def on_disconnect() -> None:
        live = pool.requests.get(request_id)
        first = live is not None and live.cancel_at is None  # not already stopping (the page's Stop)
        if pool.cancel(request_id) and first:
            logger.info("Client disconnected for request %s", request_id)

    return on_disconnect


async def chat_stream(request: Request) -> Response:
    pool: Pool = request.state.pool
    settings: Settings = request.state.settings
    data = await read_json_object(request, settings.server.max_body_bytes)
    chat = parse_chat(data, settings.modes, settings.default_mode, settings.debug.allow_wedge)
    mode = settings.modes[chat.mode]
    request_id = str(uuid.uuid4())
    job = submit(
        pool,
        request_id,
        sampling=sampling_for(mode),
        messages=chat_messages(mode, chat.history, chat.message),
        wedge_s=chat.wedge_s,
    )
    if isinstance(job, JSONResponse):
        return job
    logger.info("Streaming request %s (mode %s)", request_id, chat.mode)
    return EventStream(  # type: ignore[return-value]
        chat_events(job, chat.mode),
        on_disconnect=disconnect_cancels(pool, request_id),
        headers={"X-Request-ID": request_id},
    )


async def chat_events(job: PoolRequest, mode: str) -> AsyncIterator[bytes]:
    yield sse("init", {"request_id": job.request_id})
    while True:
        event: Event = await job.events.get()
        if isinstance(event, Token):
            yield sse("token", {"t": event.text})
        elif isinstance(event, Progress):
            yield sse("progress", {"phase": event.phase, "done": event.done, "total": event.total})
        elif isinstance(event, Queued):
            yield sse("queued", {"position": event.position})
        else:
            yield sse("done", done_payload(event, mode))
            return


def done_payload(event: Event, mode: str) -> dict[str, Any]:
    if isinstance(event, Done):
        usage = {"prompt_tokens": event.usage.prompt_tokens, "completion_tokens": event.usage.completion_tokens}
        return {"ok": True, "response": event.text, "mode_used": mode, "finish_reason": event.finish_reason, "usage": usage}
    if isinstance(event, Stopped):
        return {"ok": False, "stopped": True, "response": event.text, "mode_used": mode}
    assert isinstance(event, Failure)
    return {"ok": False, "error": event.error}


async def chat_cancel(request: Request) -> Response:
    pool: Pool = request.state.pool
    data = await read_json_object(request, request.state.settings.server.max_body_bytes)
    request_id = parse_cancel(data)
    if pool.cancel(request_id):
        logger.info("Request %s cancelled by user", request_id)
        return JSONResponse({"status": "cancelled", "request_id": request_id})
    return JSONResponse({"status": "not_found", "request_id": request_id})


async def health(request: Request) -> Response:
    report = request.state.pool.health(verbose=request.query_params.get("verbose") in ("1", "true"))
    return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)


async def modes(request: Request) -> Response:
    settings: Settings = request.state.settings
    listed = [{"name": name, "description": mode.description} for name, mode in settings.modes.items()]
    return JSONResponse({"modes": listed, "default": settings.default_mode})


async def bad_request(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BadRequest)
    return error(exc.message, exc.status)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error(exc.detail, exc.status_code)


async def server_error(request: Request, exc: Exception) -> Response:
    logger.exception("Unhandled error on %s %s", request.method, request.url.path)
    return error("internal server error; see the server log", 500)


def create_app(settings: Settings, pool: Pool) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await pool.start()
        try:
            yield {"pool": pool, "settings": settings}
        finally:
            await pool.stop()

    from edison.openai_api import openai_routes  # it builds on this module: imported once this one is

    routes: list[Route | Mount] = [
        Route("/chat/stream", chat_stream, methods=["POST"]),
        Route("/chat/cancel", chat_cancel, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/modes", modes, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *openai_routes(),
    ]
    if WEB_DIR.is_dir():
        routes.append(Mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web"))
    key = settings.server.api_key
    return Starlette(
        routes=routes,
        middleware=[Middleware(ApiKeyMiddleware, key=key, web_dir=WEB_DIR)] if key else [],
        lifespan=lifespan,
        exception_handlers={BadRequest: bad_request, HTTPException: http_error, Exception: server_error},
    )

"""The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.

The same pool, queue and three-tier cancel as `/chat/stream`. The response id (and the
`X-Request-ID` header) is the pool's bare uuid4 request id, so `POST /chat/cancel` with a
chunk's `id` stops that request. A request stopped that way while its client still listens
ends with `finish_reason: "cancelled"` (an Edison extension; OpenAI has no such reason).

A client that goes away is a cancel in every phase, queued, prefill and decode, streaming or
not: a non-streaming request races its final event against `http.disconnect` on `receive()`,
because an OpenAI client that times out just closes the socket and nothing else would tell
the worker to stop computing an answer nobody will read.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

from edison.app import disconnect_cancels
from edison.messages import Done, Progress, Token, Usage
from edison.openai_validation import (
    MODEL_PREFIX,
    ApiError,
    Completion,
    model_ids,
    parse_chat_completion,
    parse_completion,
)
from edison.pool import FINAL, Event, Failure, Pool, Queued, QueueFull, ShuttingDown, Stopped, Unavailable
from edison.pool import Request as PoolRequest
from edison.settings import Settings
from edison.sse import EventStream, watch_disconnect
from edison.validation import BadRequest, read_json_object

logger = logging.getLogger("edison")

CANCELLED = "cancelled"  # finish_reason of a request stopped by POST /chat/cancel
# The engine's PromptTooLong text (engine.py). A too-long prompt is the client's to fix: 400,
# with OpenAI's code for it, instead of a 500 that the SDK would retry twice.
PROMPT_TOO_LONG = "the prompt is "

Handler = Callable[[Request, str], Awaitable[Response]]


def openai_routes() -> list[Route]:
    return [
        Route("/v1/models", _answering(list_models), methods=["GET"]),
        Route("/v1/models/{model:path}", _answering(get_model), methods=["GET"]),
        Route("/v1/chat/completions", _answering(chat_completions), methods=["POST"]),
        Route("/v1/completions", _answering(completions), methods=["POST"]),
    ]


def _answering(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Gives each request its id and answers every error in OpenAI's shape, with the id."""

    async def endpoint(request: Request) -> Response:
        request_id = str(uuid.uuid4())
        try:
            response = await handler(request, request_id)
        except ApiError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status)
        except ClientDisconnect:  # gone while sending its body: nobody to answer
            return Response(status_code=499)
        except BadRequest as exc:  # from read_json_object: 413, 415, bad JSON
            code = "request_too_large" if exc.status == 413 else None
            response = JSONResponse(ApiError(exc.message, exc.status, code=code).body(), status_code=exc.status)
        except Exception:
            logger.exception("Unhandled error on %s %s (request %s)", request.method, request.url.path, request_id)
            error = ApiError("internal server error; see the server log", 500, kind="server_error")
            response = JSONResponse(error.body(), status_code=500)
        response.headers.setdefault("X-Request-ID", request_id)
        return response

    return endpoint


# Models.


def _model_list(pool: Pool, settings: Settings) -> list[dict[str, Any]]:
    """The loaded model (the default mode), `edison` (the same) and `edison-<mode>` for each mode."""
    try:
        created = int(os.path.getmtime(pool.model_path))
    except OSError:
        created = 0
    names = [model_ids(os.path.basename(pool.model_path))[0], MODEL_PREFIX]
    names += [f"{MODEL_PREFIX}-{mode}" for mode in settings.modes]
    return [{"id": name, "object": "model", "created": created, "owned_by": "edison"} for name in names]


async def list_models(request: Request, request_id: str) -> Response:
    return JSONResponse({"object": "list", "data": _model_list(request.state.pool, request.state.settings)})


async def get_model(request: Request, request_id: str) -> Response:
    wanted = request.path_params["model"]
    for model in _model_list(request.state.pool, request.state.settings):
        if model["id"] == wanted:
            return JSONResponse(model)
    raise ApiError(f"The model {wanted!r} does not exist", 404, "model", "model_not_found")


# Completions.


async def chat_completions(request: Request, request_id: str) -> Response:
    return await _complete(request, request_id, parse_chat_completion)


async def completions(request: Request, request_id: str) -> Response:
    return await _complete(request, request_id, parse_completion)


async def _complete(
    request: Request, request_id: str, parse: Callable[[dict[str, Any], tuple[str, ...], Settings], Completion]
) -> Response:
    pool: Pool = request.state.pool
    settings: Settings = request.state.settings
    data = await read_json_object(request, settings.server.max_body_bytes)
    parsed = parse(data, model_ids(os.path.basename(pool.model_path)), settings)
    try:
        job = pool.submit(parsed.sampling, request_id, messages=parsed.messages, prompt=parsed.prompt)
    except Unavailable as exc:  # queue full, shutting down, or no worker could start
        code = {QueueFull: "queue_full", ShuttingDown: "shutting_down"}.get(type(exc), "unavailable")
        raise ApiError(str(exc), 503, code=code, kind="server_error") from None
    shape = Shape(request_id, int(time.time()), parsed.model, chat=parsed.messages is not None)
    logger.info(
        "OpenAI %s request %s (mode %s, %s)",
        "chat" if shape.chat else "text", request_id, parsed.mode, "streaming" if parsed.stream else "whole",
    )
    on_disconnect = disconnect_cancels(pool, request_id)
    if parsed.stream:
        return EventStream(  # type: ignore[return-value]
            stream_chunks(job, shape, parsed.include_usage),
            on_disconnect=on_disconnect,
            headers={"X-Request-ID": request_id},
        )
    final = await final_event(job, request.receive, on_disconnect)
    if final is None:
        return Response(status_code=499)  # the client is gone: this is never sent
    if isinstance(final, Failure):
        raise failure_error(final, shape.chat)
    return JSONResponse(shape.body(final))


async def final_event(job: PoolRequest, receive: Receive, on_disconnect: Callable[[], None]) -> Event | None:
    """The job's final event, or None if the client went away first (then `on_disconnect` ran)."""
    final: Event | None = None
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            await watch_disconnect(receive, on_disconnect)
            group.cancel_scope.cancel()

        group.start_soon(watch)
        final = await _next_final(job)
        group.cancel_scope.cancel()
    return final


async def _next_final(job: PoolRequest) -> Event:
    while True:
        event = await job.events.get()
        if isinstance(event, FINAL):
            return event


def failure_error(failure: Failure, chat: bool) -> ApiError:
    if failure.error.startswith(PROMPT_TOO_LONG):
        return ApiError(failure.error, 400, "messages" if chat else "prompt", "context_length_exceeded")
    return ApiError(failure.error, 500, kind="server_error")


async def stream_chunks(job: PoolRequest, shape: Shape, include_usage: bool) -> AsyncIterator[bytes]:
    """`data: {chunk}` per piece of text, a last chunk with the finish_reason, then `data: [DONE]`.

    The first chunk goes out at once, before the prefill, so a client learns the id it can
    cancel by. Queue positions and prefill progress go out as SSE comments, which OpenAI
    clients skip.
    """
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    yield data_line({**shape.chunk("", None, first=True), **extra})
    while True:
        event = await job.events.get()
        if isinstance(event, Token):
            yield data_line({**shape.chunk(event.text, None), **extra})
        elif isinstance(event, Queued):
            yield f": queued {event.position}\n\n".encode()
        elif isinstance(event, Progress):
            yield f": {event.phase} {event.done}/{event.total}\n\n".encode()
        elif isinstance(event, Failure):
            yield data_line(failure_error(event, shape.chat).body())
            break
        else:
            reason, usage = outcome(event)
            yield data_line({**shape.chunk(None, reason), **extra})
            if include_usage:
                yield data_line(shape.usage_chunk(usage))
            break
    yield b"data: [DONE]\n\n"


def data_line(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def outcome(event: Event) -> tuple[str, Usage]:
    if isinstance(event, Done):
        return event.finish_reason, event.usage
    assert isinstance(event, Stopped)
    return CANCELLED, event.usage


def usage_of(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


@dataclass(frozen=True)
class Shape:
    """The OpenAI objects of one response: chat (`chat.completion[.chunk]`) or text (`text_completion`)."""

    id: str
    created: int
    model: str
    chat: bool

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def chunk(self, text: str | None, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if not self.chat:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("text_completion"), "choices": [choice]}
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": usage_of(usage)}

    def body(self, final: Event) -> dict[str, Any]:
        reason, usage = outcome(final)
        text = final.text  # type: ignore[union-attr]  # Done or Stopped
        if self.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        return {**self._head(kind), "choices": [choice], "usage": usage_of(usage)}

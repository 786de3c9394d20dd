"""The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`.

The same pool, queue and three-tier cancel as `/chat/stream`. The response id (and the
`X-Request-ID` header) is the pool's bare uuid4 request id, so `POST /chat/cancel` with a
chunk's `id` stops that request. A request stopped that way while its client still listens
ends with `finish_reason: "cancelled"` (an Edison extension; OpenAI has no such reason).

A reply constrained to tools is read by `ToolCallReader` (http/tools.py): a call goes out as
`tool_calls` deltas (or message), with `finish_reason: "tool_calls"` when the call is complete.

A client that goes away is a cancel in every phase, queued, prefill and decode, streaming or
not: a non-streaming request races its final event against `http.disconnect` on `receive()`,
because an OpenAI client that times out just closes the socket and nothing else would tell
the worker to stop computing an answer nobody will read.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edison.http.errors import CLIENT_GONE, ApiError, answering, from_failure
from edison.http.jobs import disconnect_cancels, events, final_event
from edison.http.openai_validation import MODEL_PREFIX, Completion, model_ids, parse_chat_completion, parse_completion
from edison.http.sse import EventStream, comment, frame
from edison.http.tools import ToolCallReader
from edison.http.validation import read_json_object
from edison.pool import Completed, Event, Failure, Loading, Models, Queued, Stopped
from edison.pool import Request as PoolRequest
from edison.protocol import FailureKind, Progress, Token, Usage
from edison.settings import Settings

logger = logging.getLogger("edison")

CANCELLED = "cancelled"  # finish_reason of a request stopped by POST /chat/cancel


def openai_routes() -> list[Route]:
    return [
        Route("/v1/models", answering(list_models, openai=True), methods=["GET"]),
        Route("/v1/models/{model:path}", answering(get_model, openai=True), methods=["GET"]),
        Route("/v1/chat/completions", answering(chat_completions, openai=True), methods=["POST"]),
        Route("/v1/completions", answering(completions, openai=True), methods=["POST"]),
    ]


# Models.


def served_names(pool: Models) -> dict[str, tuple[str, ...]]:
    """Each configured model and the names it answers to (its own, its file's); the default first."""
    return {name: (name, *model_ids(os.path.basename(pool.paths[name]))) for name in pool.names()}


def _model_list(pool: Models, settings: Settings) -> list[dict[str, Any]]:
    """Every configured model (with its `loaded` state), then `edison` (the default model) and
    `edison-<mode>` for each mode; `<model>/<mode>` combines any of both."""

    def created(name: str) -> int:
        try:
            return int(os.path.getmtime(pool.paths[name]))
        except OSError:
            return 0

    default = pool.default
    listed = [{"id": name, "object": "model", "created": created(name), "owned_by": "edison",
               "loaded": pool.state(name) == "ready"} for name in pool.names()]
    aliases = [MODEL_PREFIX, *(f"{MODEL_PREFIX}-{mode}" for mode in settings.modes)]
    listed += [{"id": alias, "object": "model", "created": created(default), "owned_by": "edison",
                "loaded": pool.state(default) == "ready"} for alias in aliases]
    return listed


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
    request: Request, request_id: str, parse: Callable[[dict[str, Any], dict[str, tuple[str, ...]], Settings], Completion]
) -> Response:
    pool: Models = request.state.pool
    settings: Settings = request.state.settings
    data = await read_json_object(request, settings.server.max_body_bytes)
    parsed = parse(data, served_names(pool), settings)
    job = pool.submit(parsed.sampling, request_id, messages=parsed.messages, prompt=parsed.prompt, format=parsed.format,
                      model=parsed.served_by, keep_alive=parsed.keep_alive)
    shape = Shape(request_id, int(time.time()), parsed.model, chat=parsed.messages is not None, tools=parsed.tools)
    logger.info(
        "OpenAI %s request %s (model %s, mode %s, %s)",
        "chat" if shape.chat else "text", request_id, parsed.served_by, parsed.mode,
        "streaming" if parsed.stream else "whole",
    )
    on_disconnect = disconnect_cancels(pool, request_id)
    headers = {"X-Request-ID": request_id}
    if parsed.stream:
        return EventStream(stream_chunks(job, shape, parsed.include_usage), on_disconnect, headers)  # type: ignore[return-value]
    final = await final_event(job, request.receive, on_disconnect)
    if final is None:
        return Response(status_code=CLIENT_GONE)  # the client is gone: this is never sent
    if isinstance(final, Failure):
        raise from_failure(final, shape.param(final))
    return JSONResponse(shape.body(final), headers=headers)


async def stream_chunks(job: PoolRequest, shape: Shape, include_usage: bool) -> AsyncIterator[bytes]:
    """`data: {chunk}` per piece of text, a last chunk with the finish_reason, then `data: [DONE]`.

    The first chunk goes out at once, before the prefill, so a client learns the id it can
    cancel by. Queue positions and prefill progress go out as SSE comments, which OpenAI
    clients skip.
    """
    extra: dict[str, Any] = {"usage": None} if include_usage else {}
    reader = ToolCallReader() if shape.tools else None
    yield frame({**shape.chunk("", None, first=True), **extra})
    async for event in events(job):
        if isinstance(event, Token) and reader is not None:
            for delta in reader.feed(event.text):
                yield frame({**shape.delta_chunk(delta), **extra})
        elif isinstance(event, Token):
            yield frame({**shape.chunk(event.text, None), **extra})
        elif isinstance(event, Queued):
            yield comment(f"queued {event.position}")
        elif isinstance(event, Loading):
            yield comment(f"loading {event.model} {event.elapsed_s:g}s")
        elif isinstance(event, Progress):
            yield comment(f"{event.phase} {event.done}/{event.total}")
        elif isinstance(event, Failure):
            yield frame(from_failure(event, shape.param(event)).body(openai=True))
        else:
            reason, usage = outcome(event, reader)
            for delta in reader.finish() if reader is not None else ():
                yield frame({**shape.delta_chunk(delta), **extra})
            yield frame({**shape.chunk(None, reason), **extra})
            if include_usage:
                yield frame(shape.usage_chunk(usage))
    yield b"data: [DONE]\n\n"


def outcome(event: Event, reader: ToolCallReader | None = None) -> tuple[str, Usage]:
    if isinstance(event, Completed):
        if reader is not None and reader.called and event.finish_reason == "stop":
            return "tool_calls", event.usage  # the grammar closed the call
        return event.finish_reason, event.usage
    assert isinstance(event, Stopped)
    return CANCELLED, event.usage


def usage_of(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass(frozen=True)
class Shape:
    """The OpenAI objects of one response: chat (`chat.completion[.chunk]`) or text (`text_completion`)."""

    id: str
    created: int
    model: str
    chat: bool
    tools: bool = False  # the reply may be a tool call

    def param(self, failure: Failure) -> str:
        """The request field a failure is about (a grammar is built from response_format or tools)."""
        if failure.kind is FailureKind.BAD_FORMAT:
            return "tools" if self.tools else "response_format"
        return "messages" if self.chat else "prompt"

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

    def delta_chunk(self, delta: dict[str, Any]) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return {**self._head("chat.completion.chunk"), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": usage_of(usage)}

    def body(self, final: Event) -> dict[str, Any]:
        text = final.text  # type: ignore[union-attr]  # Completed or Stopped
        reader = ToolCallReader() if self.tools else None
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if reader is not None:
            deltas = reader.feed(text) + reader.finish()
            message["content"] = "".join(d.get("content", "") for d in deltas) or None
            if reader.called:
                message["tool_calls"] = reader.message_calls()
        reason, usage = outcome(final, reader)
        if self.chat:
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            kind = "text_completion"
        return {**self._head(kind), "choices": [choice], "usage": usage_of(usage)}

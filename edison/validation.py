"""Reading and checking request bodies: every way a body can be wrong becomes a clear 4xx."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

HISTORY_ROLES = ("user", "assistant", "system")


class BadRequest(Exception):
    """Answered as `{"error": message}` with `status`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


async def read_json_object(request: Request, max_bytes: int) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise BadRequest(f"expected Content-Type: application/json, got {content_type or 'none'!r}", 415)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(f"request body is {declared} bytes; the limit is {max_bytes}", 413)
    body = bytearray()
    async for chunk in request.stream():  # a chunked body declares no length: count as it comes
        body += chunk
        if len(body) > max_bytes:
            raise BadRequest(f"request body is over the limit of {max_bytes} bytes", 413)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def reject_unknown(data: dict[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(unknown)} (known: {', '.join(known)})")


@dataclass(frozen=True)
class ChatRequest:
    message: str
    mode: str
    history: tuple[dict[str, str], ...]
    wedge_s: float


def parse_chat(data: dict[str, Any], modes: dict[str, Any], default_mode: str, allow_wedge: bool) -> ChatRequest:
    known = ("message", "mode", "history") + (("debug_wedge_s",) if allow_wedge else ())
    reject_unknown(data, known)
    message = data.get("message")
    if not isinstance(message, str):
        raise BadRequest("'message' is required and must be a string")
    if not message.strip():
        raise BadRequest("'message' must not be empty")
    mode = data.get("mode", default_mode)
    if not isinstance(mode, str):
        raise BadRequest("'mode' must be a string")
    if mode not in modes:
        raise BadRequest(f"unknown mode {mode!r}; valid modes: {', '.join(modes)}")
    wedge = data.get("debug_wedge_s", 0.0)
    if isinstance(wedge, bool) or not isinstance(wedge, (int, float)) or not 0 <= wedge <= 600:
        raise BadRequest("'debug_wedge_s' must be a number of seconds from 0 to 600")
    return ChatRequest(message, mode, parse_history(data.get("history", [])), float(wedge))


def parse_history(history: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(history, list):
        raise BadRequest("'history' must be a list of {\"role\", \"content\"} objects")
    turns = []
    for i, turn in enumerate(history):
        if not isinstance(turn, dict) or set(turn) != {"role", "content"}:
            raise BadRequest(f"history[{i}] must be an object with exactly 'role' and 'content'")
        if turn["role"] not in HISTORY_ROLES:
            raise BadRequest(f"history[{i}].role must be one of {', '.join(HISTORY_ROLES)}")
        if not isinstance(turn["content"], str):
            raise BadRequest(f"history[{i}].content must be a string")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return tuple(turns)


def parse_cancel(data: dict[str, Any]) -> str:
    reject_unknown(data, ("request_id",))
    request_id = data.get("request_id")
    if not isinstance(request_id, str) or not request_id:
        raise BadRequest("'request_id' is required and must be a non-empty string")
    return request_id

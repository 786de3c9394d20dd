"""Reading and checking request bodies: every way a body can be wrong becomes a clear 4xx.

`read_json_object` is the one door for every JSON body (both APIs): besides size and syntax it
refuses what Python's json module would let through to do harm later: nesting deep enough to
raise RecursionError, NaN and Infinity, duplicate keys (which value wins is ambiguous), and
strings holding lone surrogates ("\ud800": valid JSON, but not encodable as UTF-8).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from edison.http.errors import BadRequest
from edison.http.schema import ANY_OBJECT, check_schema
from edison.protocol import Format

HISTORY_ROLES = ("user", "assistant", "system")


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
    data = parse_json(bytes(body))
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    check_text(data)
    return data


MAX_DEPTH = 64  # far beyond any real chat body; far below Python's recursion limit


def parse_json(body: bytes) -> Any:
    depth = nesting_depth(body)
    if depth > MAX_DEPTH:
        raise BadRequest(f"request body is nested {depth} levels deep; the limit is {MAX_DEPTH}")
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique_keys)
    except BadRequest:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None


def nesting_depth(body: bytes) -> int:
    """How deep the brackets go, outside strings: checked before json.loads recurses into them."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                return deepest
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _no_constant(name: str) -> Any:
    raise BadRequest(f"request body is not valid JSON: {name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise BadRequest(f"request body has a number too large for a float: {text[:40]}")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise BadRequest(f"request body has the key {duplicate!r} more than once")
    return data


def check_text(value: Any, path: str = "") -> None:
    """Every string (and key) must be encodable as UTF-8; the error names the field."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            _encodable(item, where or "body")
        elif isinstance(item, dict):
            for key, child in item.items():
                _encodable(key, f"{where}.{key}" if where else key)
                stack.append((child, f"{where}.{key}" if where else key))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))


def _encodable(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        where = where.encode("utf-8", "backslashreplace").decode("utf-8")  # the name may hold it too
        raise BadRequest(f"'{where}' contains a lone surrogate (\\ud800-\\udfff): not valid Unicode text") from None


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
    format: Format | None = None  # "format": "json" or a JSON schema: the reply is held to it
    model: str | None = None  # None: the default model (an unknown name is the pool's 404)
    keep_alive: float | None = None  # seconds the model stays loaded idle after this request


MAX_KEEP_ALIVE_S = 7 * 24 * 3600.0


def parse_model_fields(data: dict[str, Any]) -> tuple[str | None, float | None]:
    """`model` and `keep_alive`, shared by both APIs: a name, and -1 (never), 0 or more seconds."""
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise BadRequest("'model' must be a non-empty string", param="model")
    keep = data.get("keep_alive")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float))
                             or not (keep == -1 or 0 <= keep <= MAX_KEEP_ALIVE_S)):
        raise BadRequest("'keep_alive' must be -1 (never unload), 0 (unload when done) or seconds up to a week",
                         param="keep_alive")
    return model, None if keep is None else float(keep)


def parse_chat(data: dict[str, Any], modes: dict[str, Any], default_mode: str, allow_wedge: bool) -> ChatRequest:
    known = ("message", "mode", "history", "format", "model", "keep_alive") + (("debug_wedge_s",) if allow_wedge else ())
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
    model, keep_alive = parse_model_fields(data)
    return ChatRequest(message, mode, parse_history(data.get("history", [])), float(wedge), parse_format(data.get("format")),
                       model, keep_alive)


def parse_format(value: Any) -> Format | None:
    if value is None:
        return None
    if value == "json":
        return Format(schema=ANY_OBJECT)
    if not isinstance(value, dict):
        raise BadRequest("'format' must be \"json\" or a JSON schema object")
    return Format(schema=check_schema(value, "format"))


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

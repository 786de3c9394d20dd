"""Tool calling on the OpenAI API: reading `tools`/`tool_choice`, writing tool calls of the history
into the text the model reads, and reading the calls back out of a constrained reply as it streams.

On the wire between worker and route a call is text the grammar enforces (protocol.py):
`<tool_call>{"name": "f", "arguments": {...}}</tool_call>`, with at most one space wherever the
schema converter allows one. `ToolCallReader` turns that into OpenAI's `tool_calls` deltas:
first the call's id and name (once the name is complete), then the arguments in pieces, holding
back only what may be the wrapper's closing `} </tool_call>`.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from edison.http.errors import ApiError
from edison.http.schema import check_schema
from edison.protocol import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Format, Tool

MAX_TOOLS = 64
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for a function name
NO_ARGUMENTS = {"type": "object", "properties": {}}
_HEAD = re.compile(re.escape(TOOL_CALL_OPEN) + r'\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]+)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = re.compile(r"\s*\}\s*$")


def parse_tools(tools: Any, choice: Any) -> Format | None:
    """The format a request's tools ask for; None when no call may be made (`tool_choice` "none")."""
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise ApiError("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise ApiError(f"'tools' must be a list of at most {MAX_TOOLS} function tools", param="tools")
    parsed = tuple(_tool(t, f"tools[{i}]") for i, t in enumerate(tools))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise ApiError("'tools' names a function more than once", param="tools")
    if choice is None or choice in ("auto", "required"):
        return Format(tools=parsed, tool_choice=choice or "auto")
    if choice == "none":
        return None
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if named not in names:
        raise ApiError(
            "'tool_choice' must be \"none\", \"auto\", \"required\" or "
            '{"type": "function", "function": {"name": <one of the tools>}}', param="tool_choice",
        )
    return Format(tools=parsed, tool_choice=named)


def _tool(tool: Any, param: str) -> Tool:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ApiError(f"{param} must be {{\"type\": \"function\", \"function\": {{...}}}}", param=param)
    function = tool["function"]
    unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise ApiError(f"{param}.function has unsupported field(s): {', '.join(unknown)}", param=param)
    name = function.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ApiError(f"{param}.function.name must be 1-64 letters, digits, '_' or '-'", param=f"{param}.function.name")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise ApiError(f"{param}.function.description must be a string", param=f"{param}.function.description")
    parameters = function.get("parameters", NO_ARGUMENTS)
    text = check_schema(parameters, f"{param}.function.parameters")
    if parameters.get("type", "object") != "object":
        raise ApiError(f"{param}.function.parameters must describe an object", param=f"{param}.function.parameters")
    return Tool(name, description, text)


def written_calls(calls: Any, param: str) -> str:
    """An assistant message's `tool_calls`, as the text the model would have written."""
    if not isinstance(calls, list):
        raise ApiError(f"{param} must be a list", param=param)
    text = []
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(f"{param}[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}", param=param)
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, ValueError):
            raise ApiError(f"{param}[{i}].function.arguments must be a JSON text", param=param) from None
        text.append(TOOL_CALL_OPEN + json.dumps({"name": function["name"], "arguments": arguments}) + TOOL_CALL_CLOSE)
    return "".join(text)


class ToolCallReader:
    """Reads a reply constrained to a tool call (or, with "auto", text) as its pieces arrive.

    `feed` and `finish` return OpenAI deltas: `{"content": ...}` or `{"tool_calls": [...]}`.
    """

    def __init__(self) -> None:
        self.buffer = ""
        self.kind: str | None = None  # "text" or "call", decided by the reply's first character
        self.call_id = f"call_{uuid.uuid4().hex[:24]}"
        self.name: str | None = None
        self.start = 0  # where the arguments begin in `buffer`
        self.sent = 0  # how much of them went out
        self.arguments = ""

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.kind == "text":
            return [{"content": text}] if text else []
        self.buffer += text
        if self.kind is None and self.buffer:
            self.kind = "call" if self.buffer.startswith("<") else "text"  # the grammar's rule
            if self.kind == "text":
                return [{"content": self.buffer}]
        return self._call(final=False)

    def finish(self) -> list[dict[str, Any]]:
        """The rest, once the reply ended (by itself or cut by max_tokens)."""
        if self.kind != "call":
            return []
        deltas = self._call(final=True)
        if self.name is None and self.buffer:  # cut before the name was complete: nothing to call
            return [{"content": self.buffer}]
        return deltas

    @property
    def called(self) -> bool:
        return self.name is not None

    def message_calls(self) -> list[dict[str, Any]]:
        """The whole call, for a non-streaming answer."""
        if self.name is None:
            return []
        return [{"id": self.call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}]

    def _call(self, final: bool) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        if self.name is None:
            head = _HEAD.match(self.buffer)
            if head is None:
                return deltas
            self.name, self.start = head.group(1), head.end()
            function = {"name": self.name, "arguments": ""}
            deltas.append({"tool_calls": [{"index": 0, "id": self.call_id, "type": "function", "function": function}]})
        body = self.buffer[self.start :]
        end = self._held(body)
        if end > self.sent:
            piece = body[self.sent : end]
            self.sent, self.arguments = end, self.arguments + piece
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        return deltas

    @staticmethod
    def _held(body: str) -> int:
        """How much of `body` is surely arguments: all but a tail that may be the closing
        `}` + spaces + (a beginning of) `</tool_call>`."""
        cut = body.rfind("}")
        if cut < 0:
            return len(body.rstrip())
        if not TOOL_CALL_CLOSE.startswith(body[cut + 1 :].lstrip()):
            return len(body)  # that "}" is inside the arguments: text came after it
        tail = _TAIL.search(body[: cut + 1])
        return tail.start() if tail else cut

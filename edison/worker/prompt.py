"""Turns chat messages into prompt text, and filters stop strings out of the stream.

A GGUF that carries a chat template gets it. One that does not (the bundled Gemma 3 270M
is a base model without one) gets a plain transcript, "User: ...\\nAssistant:", with
"\\nUser:" as a stop string: measured on that model, the Gemma turn markup made it echo the
question and drift, while the transcript made it answer.

Tools (a job whose `Format` lists them) reach the prompt through the chat template when it
takes a `tools` variable; otherwise as a plain list in the system message. Either way the
system message says how a call is written (`TOOL_CALL_OPEN {json} TOOL_CALL_CLOSE`), because
the grammar only lets the model write it that way. A tool's result (role "tool") is a
"Tool:" turn of the transcript, or a user turn for a template that knows no tool role.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edison.protocol import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, Format

TRANSCRIPT_STOPS = ("\nUser:",)
_SPEAKERS = {"user": "User", "assistant": "Assistant", "tool": "Tool"}


@dataclass(frozen=True)
class Prompt:
    text: str
    stops: tuple[str, ...]
    special: bool  # parse special-token text (a template's markup); never for a transcript


def render_transcript(messages: list[dict[str, str]]) -> str:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    lines = [system + "\n"] if system else []
    lines += [_turn(m) for m in messages if m["role"] != "system"]
    return "\n".join(lines) + "\nAssistant:"


def _turn(message: dict[str, str]) -> str:
    """One "Speaker: text" line. The prompt ends on "Assistant:", so the model's reply starts
    with its own blank (" Sure..."): a reply sent back as streamed is written right after the
    colon, as the model wrote it, or a returning turn would diverge from the KV cache at its
    first reply token and read the whole reply again."""
    content = message["content"]
    gap = "" if message["role"] == "assistant" and content[:1].isspace() else " "
    return f"{_SPEAKERS[message['role']]}:{gap}{content}"


class PromptFormat:
    """Chosen once per worker from the model's metadata."""

    def __init__(self, metadata: dict[str, str], choice: str, bos: str, eos: str) -> None:
        template = metadata.get("tokenizer.chat_template")
        if choice == "template" and not template:
            raise ValueError("model.prompt_format = 'template', but the model has no chat template")
        self.formatter: Any = None
        if template and choice != "transcript":
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self.formatter = Jinja2ChatFormatter(template=template, bos_token=bos, eos_token=eos)
        self.name = "template" if self.formatter else "transcript"

    def render(self, messages: list[dict[str, str]], fmt: Format | None = None) -> Prompt:
        takes_tools = self.formatter is not None and "tools" in self.formatter.template
        tools = fmt.tools if fmt is not None else ()
        if tools:
            messages = with_tool_instructions(messages, fmt, listed=not takes_tools)  # type: ignore[arg-type]
        if self.formatter is None:
            return Prompt(render_transcript(messages), TRANSCRIPT_STOPS, special=False)
        if "tool" not in self.formatter.template:  # a template that knows no tool turns
            messages = [_as_user(m) if m["role"] == "tool" else m for m in messages]
        listing = [_openai_tool(t) for t in tools] if takes_tools and tools else None
        result = self.formatter(messages=messages, tools=listing)
        stop = result.stop or ()
        return Prompt(result.prompt, (stop,) if isinstance(stop, str) else tuple(stop), special=True)


def with_tool_instructions(messages: list[dict[str, str]], fmt: Format, listed: bool) -> list[dict[str, str]]:
    """The system message, extended with how to call a tool (and the tools, if `listed`)."""
    lines = []
    if listed:
        lines.append("You can call these tools (JSON schemas of their arguments):")
        lines += [json.dumps({"name": t.name, "description": t.description, "parameters": json.loads(t.parameters)})
                  for t in fmt.tools]
    lines.append(
        f'To call a tool, reply with {TOOL_CALL_OPEN}{{"name": "<tool name>", "arguments": {{...}}}}{TOOL_CALL_CLOSE} '
        "and nothing else; its result comes back in the next turn."
    )
    text = "\n".join(lines)
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _as_user(message: dict[str, str]) -> dict[str, str]:
    return {"role": "user", "content": f"Tool result: {message['content']}"}


def _openai_tool(tool: Any) -> dict[str, Any]:
    function = {"name": tool.name, "description": tool.description, "parameters": json.loads(tool.parameters)}
    return {"type": "function", "function": function}


class StopFilter:
    """Holds back text that may be the start of a stop string, so no stop string is ever streamed."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was reached)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = max((self._overlap(s) for s in self.stops), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _overlap(self, stop: str) -> int:
        """Length of the longest tail of `pending` that is a head of `stop`."""
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if stop.startswith(self.pending[-n:]):
                return n
        return 0

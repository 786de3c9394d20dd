"""Turns chat messages into prompt text, and filters stop strings out of the stream.

A GGUF that carries a chat template gets it. One that does not (the bundled Gemma 3 270M
is a base model without one) gets a plain transcript, "User: ...\\nAssistant:", with
"\\nUser:" as a stop string: measured on that model, the Gemma turn markup made it echo the
question and drift, while the transcript made it answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TRANSCRIPT_STOPS = ("\nUser:",)
_SPEAKERS = {"user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Prompt:
    text: str
    stops: tuple[str, ...]
    special: bool  # parse special-token text (a template's markup); never for a transcript


def render_transcript(messages: list[dict[str, str]]) -> str:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    lines = [system + "\n"] if system else []
    lines += [f"{_SPEAKERS[m['role']]}: {m['content']}" for m in messages if m["role"] != "system"]
    return "\n".join(lines) + "\nAssistant:"


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

    def render(self, messages: list[dict[str, str]]) -> Prompt:
        if self.formatter is None:
            return Prompt(render_transcript(messages), TRANSCRIPT_STOPS, special=False)
        result = self.formatter(messages=messages)
        stop = result.stop or ()
        return Prompt(result.prompt, (stop,) if isinstance(stop, str) else tuple(stop), special=True)


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

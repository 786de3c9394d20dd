"""Reading OpenAI-style request bodies (`/v1/chat/completions`, `/v1/completions`) into a job.

Every way a body can be wrong becomes an `ApiError`, answered in OpenAI's error shape. A field
the service cannot honour (`n` > 1, `functions`, `logprobs`) is refused with a 400 that names it,
rather than silently ignored: a client that asked for two choices must not get one. Fields
clients send by habit with a value that changes nothing (`presence_penalty: 0`, `user`, ...)
are accepted and ignored. Anything else unknown is a 400, as on OpenAI's own API.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edison.http.errors import ApiError
from edison.http.jobs import with_system_prompt
from edison.http.schema import parse_response_format
from edison.http.tools import parse_tools, written_calls
from edison.http.validation import parse_model_fields
from edison.protocol import Format
from edison.settings import ModeSettings, Sampling, Settings

MODEL_PREFIX = "edison"  # "edison" is the default mode; "edison-<mode>" names a mode
MAX_STOPS = 4  # OpenAI's own limit on `stop`
MAX_SEED = 2**32 - 2  # llama.cpp reads 2**32 - 1 (LLAMA_DEFAULT_SEED) as "pick a random seed"

# Role names a client may send -> the role the prompt renderer knows. "developer" is OpenAI's
# newer name for "system".
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal")


@dataclass(frozen=True)
class Completion:
    """One parsed request: exactly one of `messages` (chat) and `prompt` (raw text) is set."""

    model: str  # as the client named it; echoed in every response
    mode: str
    served_by: str  # the configured model that answers it
    sampling: Sampling
    stream: bool
    include_usage: bool
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    format: Format | None = None  # a constrained reply: JSON (response_format) or tool calls
    keep_alive: float | None = None  # Edison's (and Ollama's) extension: seconds loaded idle after it

    @property
    def tools(self) -> bool:
        """The reply may be a tool call, to be read out of the text (http/tools.py)."""
        return self.format is not None and bool(self.format.tools)


def _absent(*allowed: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or any(v == a and type(v) is type(a) for a in allowed)


# Accepted but ignored while their value changes nothing; any other value is a 400.
HARMLESS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "user": (lambda v: v is None or isinstance(v, str), "a string"),
    "presence_penalty": (lambda v: v is None or (_is_number(v) and v == 0), "0 (penalties are not supported)"),
    "frequency_penalty": (lambda v: v is None or (_is_number(v) and v == 0), "0 (penalties are not supported)"),
    "logit_bias": (lambda v: v is None or v == {}, "empty (logit_bias is not supported)"),
    "logprobs": (_absent(False), "false or null (logprobs are not supported)"),
    "n": (_absent(1), "1 (one choice per request)"),
    "stream_options": (lambda v: v is None or isinstance(v, dict), "an object"),
    "metadata": (lambda v: v is None or isinstance(v, dict), "an object"),
    "service_tier": (lambda v: v is None or isinstance(v, str), "a string"),
    # Chat only.
    "top_logprobs": (_absent(0), "0 or null (logprobs are not supported)"),
    "functions": (lambda v: v is None or v == [], "empty (the legacy functions API is not supported; use tools)"),
    "function_call": (_absent("none", "auto"), '"none" or "auto" (the legacy functions API is not supported; use tools)'),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "a boolean (one call per reply either way)"),
    "store": (_absent(False), "false (completions are not stored)"),
    # Completions only.
    "echo": (_absent(False), "false (echo is not supported)"),
    "suffix": (_absent(""), "null (suffix is not supported)"),
    "best_of": (_absent(1), "1 (one choice per request)"),
}
COMMON_FIELDS = ("model", "keep_alive", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n",
                 "user", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "metadata", "service_tier")
CHAT_FIELDS = COMMON_FIELDS + ("messages", "max_completion_tokens", "top_logprobs", "tools", "functions",
                               "tool_choice", "function_call", "parallel_tool_calls", "response_format", "store")
COMPLETION_FIELDS = COMMON_FIELDS + ("prompt", "echo", "suffix", "best_of", "response_format")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def model_ids(model_file: str) -> tuple[str, ...]:
    """The names a model's file answers to: the file name, and that without `.gguf`."""
    stem = model_file[: -len(".gguf")] if model_file.endswith(".gguf") else model_file
    return (model_file,) if stem == model_file else (model_file, stem)


Models = dict[str, tuple[str, ...]]  # configured model -> every name it answers to; the default first


def resolve_model(model: Any, models: Models, settings: Settings) -> tuple[str, str]:
    """(model, mode) for `model`: a model's name (or file), `edison` / `edison-<mode>` (the
    default model in a mode), or both as `<model>/<mode>`."""
    if not isinstance(model, str) or not model:
        raise ApiError("'model' is required and must be a string", param="model")
    name, _, mode = model.partition("/")
    default = next(iter(models))
    if not mode:
        served = next((m for m, aliases in models.items() if name in aliases), None)
        if served is not None:
            return served, settings.default_mode
        if name == MODEL_PREFIX:
            return default, settings.default_mode
        mode = name.removeprefix(f"{MODEL_PREFIX}-")
        if mode != name and mode in settings.modes:
            return default, mode
    else:
        served = next((m for m, aliases in models.items() if name in aliases), None)
        mode = mode.removeprefix(f"{MODEL_PREFIX}-")
        if served is not None and mode in settings.modes:
            return served, mode
    known = ", ".join((*models, MODEL_PREFIX, *(f"{MODEL_PREFIX}-{m}" for m in settings.modes),
                       f"<model>/<mode> (modes: {', '.join(settings.modes)})"))
    error = ApiError(f"The model {model!r} does not exist; available: {known}", 404, "model", "model_not_found")
    error.extra = {"available": list(models)}
    raise error


def parse_chat_completion(data: dict[str, Any], models: Models, settings: Settings) -> Completion:
    _check_fields(data, CHAT_FIELDS)
    served, mode_name = resolve_model(data.get("model"), models, settings)
    mode = settings.modes[mode_name]
    messages = with_system_prompt(mode, parse_messages(data.get("messages")))
    limit = "max_completion_tokens" if data.get("max_completion_tokens") is not None else "max_tokens"
    tools = parse_tools(data.get("tools"), data.get("tool_choice"))
    json_format = parse_response_format(data.get("response_format"))
    if tools and json_format:
        raise ApiError("'response_format' cannot be combined with tools that may be called", param="response_format")
    return _completion(data, served, mode_name, mode, limit, messages=messages, format=tools or json_format)


def parse_completion(data: dict[str, Any], models: Models, settings: Settings) -> Completion:
    _check_fields(data, COMPLETION_FIELDS)
    served, mode_name = resolve_model(data.get("model"), models, settings)
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # the SDK's list form, with the one prompt we serve
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        raise ApiError("token-id prompts are not supported; send the prompt as text", param="prompt")
    if not isinstance(prompt, str):
        raise ApiError("'prompt' is required and must be a string (or a list of one string)", param="prompt")
    fmt = parse_response_format(data.get("response_format"))
    return _completion(data, served, mode_name, settings.modes[mode_name], "max_tokens", prompt=prompt, format=fmt)


def _check_fields(data: dict[str, Any], known: tuple[str, ...]) -> None:
    for key in sorted(data):
        if key not in known:
            raise ApiError(f"Unrecognized request argument supplied: {key}", param=key)
        if key in HARMLESS:
            ok, expected = HARMLESS[key]
            if not ok(data[key]):
                raise ApiError(f"'{key}' must be {expected}; got {data[key]!r}", param=key)


def _completion(data: dict[str, Any], served: str, mode_name: str, mode: ModeSettings, limit: str, **job: Any) -> Completion:
    overrides: dict[str, Any] = {}
    if data.get(limit) is not None:
        overrides["max_tokens"] = _integer(data, limit, 1, 1_000_000)
    if data.get("temperature") is not None:
        overrides["temperature"] = _number(data, "temperature", 0.0, 2.0)
    if data.get("top_p") is not None:
        overrides["top_p"] = _number(data, "top_p", 0.0, 1.0)
    if data.get("seed") is not None:
        overrides["seed"] = _integer(data, "seed", 0, MAX_SEED)
    if data.get("stop") is not None:
        overrides["stop"] = _stops(data["stop"])
    stream = data.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError("'stream' must be a boolean", param="stream")
    include_usage = (data.get("stream_options") or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError("'stream_options.include_usage' must be a boolean", param="stream_options")
    sampling = dataclasses.replace(mode.sampling, **overrides)
    _, keep_alive = parse_model_fields({"keep_alive": data.get("keep_alive")})
    return Completion(data["model"], mode_name, served, sampling, bool(stream), include_usage, keep_alive=keep_alive, **job)


def _number(data: dict[str, Any], key: str, low: float, high: float) -> float:
    value = data[key]
    if not _is_number(value) or not low <= value <= high:
        raise ApiError(f"'{key}' must be a number from {low:g} to {high:g}; got {value!r}", param=key)
    return float(value)


def _integer(data: dict[str, Any], key: str, low: int, high: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(f"'{key}' must be an integer from {low} to {high}; got {value!r}", param=key)
    return value


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise ApiError(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop")
    return tuple(s for s in stops if s)


def parse_messages(value: Any) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ApiError("'messages' is required and must be a non-empty list of {role, content} objects", param="messages")
    return tuple(_message(m, f"messages[{i}]") for i, m in enumerate(value))


def _message(message: Any, param: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise ApiError(f"{param} must be an object with 'role' and 'content'", param=param)
    unknown = sorted(set(message) - set(MESSAGE_KEYS))
    if unknown:
        raise ApiError(f"{param} has unsupported field(s): {', '.join(unknown)}", param=param)
    role = message.get("role")
    if role == "function" or message.get("function_call"):
        raise ApiError(f"{param}: the legacy function-call messages are not supported; use tools", param=param)
    if role not in ROLES:
        raise ApiError(f"{param}.role must be one of {', '.join(ROLES)}; got {role!r}", param=f"{param}.role")
    if message.get("tool_calls"):  # an earlier call of a tool loop, written as the model writes one
        if role != "assistant":
            raise ApiError(f"{param}: only assistant messages carry tool_calls", param=param)
        content = message.get("content")
        text = "" if content is None else _text(content, f"{param}.content")
        return {"role": "assistant", "content": text + written_calls(message["tool_calls"], f"{param}.tool_calls")}
    return {"role": ROLES[role], "content": _text(message.get("content"), f"{param}.content")}


def _text(content: Any, param: str) -> str:
    """A string, or a list of text parts joined by newlines (the way vLLM joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(f"{param} must be a string or a list of text parts", param=param)
    texts = []
    for i, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else None
            why = f"{kind!r} parts are not supported, only text" if kind and kind != "text" else "must be {type: 'text', text: str}"
            raise ApiError(f"{param}[{i}] {why}", param=f"{param}[{i}]")
        texts.append(part["text"])
    return "\n".join(texts)

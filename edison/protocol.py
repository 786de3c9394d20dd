"""What crosses the pipes between the pool and a worker: small frozen dataclasses, exit codes,
and the named outcomes (stop tiers, failure kinds) that travel with them.

Every message from a worker carries the job id it belongs to, so the pool can drop stale ones
(a `Token` that was in flight when its job was cancelled must not reach the next job).
Imported by both sides of the pipe: it must never import starlette or llama_cpp.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from edison.settings import Sampling

EXIT_LOAD_FAILED = 3  # the model could not load: the pool backs off instead of spinning
EXIT_ORPHANED = 4  # the parent was gone before the worker got going


class Tier(str, enum.Enum):
    """Which cancel tier ended a stopped request (`stopped_by` in the final `done` event)."""

    QUEUED = "queued"  # it never left the queue
    TOKEN = "token"  # the generation loop saw the flag between two tokens
    CHUNK = "chunk"  # ... between two prefill chunks (what bounds a stop on a GPU backend)
    NATIVE = "native"  # llama.cpp's abort callback ended a llama_decode call
    KILL = "kill"  # the worker missed the cancel deadline and was killed (tier 3)
    COMPLETED = "completed"  # the job ended on its own before the cancel reached it


class FailureKind(str, enum.Enum):
    """Why a request failed, for the HTTP layer to map to a status code: never parsed from text."""

    PROMPT_TOO_LONG = "prompt_too_long"  # the client's to fix: 400
    BAD_PROMPT = "bad_prompt"  # text the model cannot take (e.g. not encodable): 400
    BAD_FORMAT = "bad_format"  # a schema or tool list whose grammar the worker cannot build: 400
    WORKER_DIED = "worker_died"
    GENERATION_FAILED = "generation_failed"
    SHUTTING_DOWN = "shutting_down"
    NO_WORKERS = "no_workers"
    QUEUE_FULL = "queue_full"
    MODELS_BUSY = "models_busy"  # a model cannot be loaded now: the loaded ones are all busy, or it is too big


# How a tool call is written in a reply constrained to tools (and in the history the model
# reads back): Hermes/Qwen style, one JSON object with the tool's name and its arguments.
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: str  # its arguments' JSON schema, as JSON text (already checked by the HTTP layer)


@dataclass(frozen=True)
class Format:
    """What a reply must be, enforced by a grammar the worker builds for its sequence.

    Without tools: one JSON value matching `schema`. With tools: one tool call
    (`TOOL_CALL_OPEN {"name": ..., "arguments": {...}} TOOL_CALL_CLOSE`), or, when
    `tool_choice` is "auto", either that or plain text.
    """

    schema: str = ""  # a JSON schema as JSON text; only without tools
    tools: tuple[Tool, ...] = ()
    tool_choice: str = "auto"  # with tools: "auto", "required", or the name of the one tool to call


@dataclass(frozen=True)
class Resume:
    """A job that continues one whose worker was lost: its prompt plus the text already streamed
    is prefilled, and generation goes on with what is left of the token budget."""

    text: str
    completion_tokens: int


@dataclass(frozen=True)
class Job:
    """One generation. Exactly one of `messages` (chat) and `prompt` (raw text) is set."""

    job_id: int
    request_id: str
    sampling: Sampling
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    wedge_s: float = 0.0  # debug only: sleep in C, deaf to the cancel flag, before generating
    slot: int = 0  # the worker's sequence slot this job runs in (its cancel flag)
    resume: Resume | None = None
    format: Format | None = None  # a constrained reply (structured output, tool calls)


# Worker -> pool.


@dataclass(frozen=True)
class Ready:
    """The model is loaded; the worker takes jobs from now on."""

    pid: int
    model: str
    n_ctx: int
    slots: int = 1
    packages: tuple[str, ...] = ()  # top-level packages loaded in the worker: proof of the layers
    prompt_format: str = ""  # "template" (the GGUF's chat template) or "transcript"


@dataclass(frozen=True)
class Threads:
    """The worker now computes with this many threads (its share of the cores: pool/cpu.py)."""

    threads: int
    threads_batch: int


@dataclass(frozen=True)
class Progress:
    job_id: int
    done: int
    total: int
    phase: str = "prefill"


@dataclass(frozen=True)
class Token:
    job_id: int
    text: str
    tokens: int = 1  # completion tokens sampled since the last Token of this job


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV cache was kept from an earlier turn, not read again
    cached_from: str = ""  # "slot" (still in the sequence), "ram" or "disk" (a saved state), "" (none)


@dataclass(frozen=True)
class Done:
    job_id: int
    text: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class Cancelled:
    """The generation loop itself saw the flag: this is the acknowledgement the deadline waits for."""

    job_id: int
    text: str
    tier: Tier
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class Failed:
    job_id: int
    error: str  # for the client
    kind: FailureKind = FailureKind.GENERATION_FAILED
    traceback: str = ""  # for the log

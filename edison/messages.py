"""What crosses the pipes between the pool and a worker: small frozen dataclasses.

Every message carries the job id it belongs to, so the pool can drop stale ones (a
`Token` that was in flight when its job was cancelled must not reach the next job).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    max_tokens: int = 512
    seed: int = -1
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    """One generation. Exactly one of `messages` (chat) and `prompt` (raw text) is set."""

    job_id: int
    request_id: str
    sampling: Sampling
    messages: tuple[dict[str, str], ...] | None = None
    prompt: str | None = None
    wedge_s: float = 0.0  # debug only: sleep in C, deaf to the cancel flag, before generating


# Worker -> pool.


@dataclass(frozen=True)
class Ready:
    """The model is loaded; the worker takes jobs from now on."""

    pid: int
    model: str
    n_ctx: int


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


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


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
    tier: str  # "token" (between tokens), "chunk" (between prefill chunks), "native" (abort callback)
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class Failed:
    job_id: int
    error: str  # for the client
    traceback: str = ""  # for the log

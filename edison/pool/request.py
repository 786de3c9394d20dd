"""One request's record in the pool, and the events its consumer (an HTTP route) reads.

A consumer reads `Request.events` until one final event (`Completed`, `Stopped`, `Failure`)
arrives; everything before it is `Queued`, `Loading`, `Progress` or `Token`. Outcomes are typed: the HTTP
layer maps a `FailureKind` and a `Tier` to the wire, it never parses text.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from edison.protocol import FailureKind, Job, Progress, Tier, Token, Usage

if TYPE_CHECKING:
    from edison.pool.handle import WorkerHandle


@dataclass(frozen=True)
class Queued:
    position: int  # 1 = next to run


@dataclass(frozen=True)
class Loading:
    """The request waits for its model to load (sent at once, then every LOADING_EVERY_S)."""

    model: str
    elapsed_s: float


@dataclass(frozen=True)
class Completed:
    text: str
    finish_reason: str  # "stop" or "length"
    usage: Usage


@dataclass(frozen=True)
class Stopped:
    text: str
    tier: Tier
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    error: str


Event = Union[Queued, Loading, Progress, Token, Completed, Stopped, Failure]
FINAL = (Completed, Stopped, Failure)


@dataclass(eq=False)
class Request:
    job: Job
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    worker: WorkerHandle | None = None
    slot: int | None = None
    parts: list[str] = field(default_factory=list)  # text streamed so far, across a resume
    completion_tokens: int = 0  # tokens behind `parts`, as the Token messages counted them
    kept_tokens: int = 0  # completion tokens of the worker that was lost, when resumed
    prompt_tokens: int = 0  # of the original prompt (a resumed job's prompt is longer)
    cached_tokens: int = 0  # of those, found in the worker's KV cache instead of read again
    cached_from: str = ""  # where: "slot", "ram", "disk" ("" for none)
    resumed: int = 0  # times this request was moved to another worker after a loss
    cancel_at: float | None = None  # time.monotonic() of the first cancel
    submitted_at: float = field(default_factory=time.monotonic)
    dispatched_at: float | None = None
    first_token_at: float | None = None
    deadline: asyncio.TimerHandle | None = None
    finished: bool = False

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.cached_from)

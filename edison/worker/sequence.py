"""One sequence of a worker's batch: a job in one KV sequence, with its own sampler chain,
its own token list and its own place in the KV cache.

`tokens` holds every token of the sequence (prompt, then each sampled token); `n_past` is how
many of them the KV cache holds. What the next step decodes for it is `tokens[n_past:]`: a
prefill piece, or the one token sampled last. That single invariant is what lets a step that
was aborted half-way be re-submitted with no token lost or repeated.
"""

from __future__ import annotations

import codecs
import random
from collections import deque
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from edison.protocol import Job, Token, Usage
from edison.settings import Sampling
from edison.worker.grammar import Constraint
from edison.worker.prompt import StopFilter

PENALTY_LAST_N = 64  # tokens the repeat penalty looks back over (llama-cpp-python's default)


def sampler_chain(sampling: Sampling) -> llama_cpp.llama_sampler_p:
    """The chain llama-cpp-python's `Llama` builds for the same settings, one per sequence,
    minus its first link, the repeat penalty: `Sequence.sample` applies that to the logits row
    itself. llama.cpp's penalty sampler looks up every one of the vocabulary's 262,144 tokens
    in a hash map (~1 ms a token here, a fifth of a 4-sequence step); the same penalty on the
    at most 64 tokens it can touch costs microseconds."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    if sampling.temperature == 0:
        add(chain, llama_cpp.llama_sampler_init_greedy())
    else:
        seed = sampling.seed if sampling.seed >= 0 else random.getrandbits(31)
        add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        add(chain, llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
        add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        add(chain, llama_cpp.llama_sampler_init_dist(seed))
    return chain


def repeat_penalty(logits: np.ndarray, recent: deque[int], penalty: float) -> None:
    """llama.cpp's repeat penalty (its penalty sampler with no frequency or presence part), in
    place: each distinct recent token's logit once, divided if positive, else multiplied."""
    seen = np.fromiter(set(recent), dtype=np.int64)
    values = logits[seen]
    logits[seen] = np.where(values <= 0, values * np.float32(penalty), values / np.float32(penalty))


@dataclass(eq=False)
class Sequence:
    job: Job
    seq_id: int  # the KV sequence it occupies
    tokens: list[int]
    prompt_len: int  # tokens[:prompt_len] is the prompt (with resumed text, if any)
    prompt_tokens: int  # the original prompt's length, for usage
    max_new: int  # tokens it may still sample
    stops: StopFilter
    sampler: llama_cpp.llama_sampler_p
    n_vocab: int = 0
    constraint: Constraint | None = None  # its own grammar, if the job asked for a format
    n_past: int = 0
    reused: int = 0  # prompt tokens found in the KV cache when the job joined
    cached_from: str = ""  # where those came from: "slot", "ram" or "disk" ("" if none)
    sampled: int = 0  # tokens sampled by this job
    unsent: int = 0  # sampled since the last Token message
    parts: list[str] = field(default_factory=list)
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=PENALTY_LAST_N))  # what the penalty sees

    @property
    def decoding(self) -> bool:
        """Past its prompt: a cancel now is a stop between tokens, not between chunks."""
        return self.n_past >= self.prompt_len

    def pending(self) -> int:
        return len(self.tokens) - self.n_past

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.sampled, min(self.reused, self.prompt_tokens), self.cached_from)

    def text(self) -> str:
        return "".join(self.parts)

    def emit_text(self, text: str, emit: object) -> None:
        if text:
            self.parts.append(text)
            emit(Token(self.job.job_id, text, self.unsent))  # type: ignore[operator]
            self.unsent = 0

    def sample(self, ctx: llama_cpp.llama_context_p, row: int) -> int:
        sampling = self.job.sampling
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,))
        if sampling.repeat_penalty != 1.0 and self.recent:
            repeat_penalty(logits, self.recent, sampling.repeat_penalty)
        if self.constraint is not None:
            token = self.constraint.sample(self.sampler, ctx, row)
        elif sampling.temperature == 0:  # the greedy sampler's choice, without its 262,144-entry copy
            token = int(logits.argmax())
        else:
            token = llama_cpp.llama_sampler_sample(self.sampler, ctx, row)
        self.recent.append(token)
        return token

    def free(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)
        if self.constraint is not None:
            self.constraint.free()

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
from dataclasses import dataclass, field

import llama_cpp

from edison.protocol import Job, Token, Usage
from edison.settings import Sampling
from edison.worker.grammar import Constraint
from edison.worker.prompt import StopFilter

PENALTY_LAST_N = 64  # tokens the repeat penalty looks back over (llama-cpp-python's default)


def sampler_chain(sampling: Sampling, n_vocab: int) -> llama_cpp.llama_sampler_p:
    """The chain llama-cpp-python's `Llama` builds for the same settings, one per sequence."""
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    add = llama_cpp.llama_sampler_chain_add
    add(chain, llama_cpp.llama_sampler_init_penalties(n_vocab, PENALTY_LAST_N, sampling.repeat_penalty, 0.0, 0.0))
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
    constraint: Constraint | None = None  # its own grammar, if the job asked for a format
    n_past: int = 0
    sampled: int = 0  # tokens sampled by this job
    unsent: int = 0  # sampled since the last Token message
    parts: list[str] = field(default_factory=list)
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))

    @property
    def decoding(self) -> bool:
        """Past its prompt: a cancel now is a stop between tokens, not between chunks."""
        return self.n_past >= self.prompt_len

    def pending(self) -> int:
        return len(self.tokens) - self.n_past

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.sampled)

    def text(self) -> str:
        return "".join(self.parts)

    def emit_text(self, text: str, emit: object) -> None:
        if text:
            self.parts.append(text)
            emit(Token(self.job.job_id, text, self.unsent))  # type: ignore[operator]
            self.unsent = 0

    def sample(self, ctx: llama_cpp.llama_context_p, row: int) -> int:
        if self.constraint is not None:
            return self.constraint.sample(self.sampler, ctx, row)
        return llama_cpp.llama_sampler_sample(self.sampler, ctx, row)

    def free(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)
        if self.constraint is not None:
            self.constraint.free()

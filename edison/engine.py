"""The generation loop inside a worker: one `llama_cpp.Llama`, one job at a time.

Cancellation reaches it in three places, all reading the same flag:
- before every sampled token (tier 1, "token");
- between prefill chunks of `prefill_chunk` tokens (tier 1 for prompts, "chunk": what bounds a
  stop on a GPU backend, where llama.cpp does not honour the abort callback mid-kernel);
- inside `llama_decode` through llama.cpp's abort callback (tier 2, "native"): on the CPU
  backend a long prefill stops within one graph node.
Tier 3 (the kill) lives in the pool, for a worker that ignores all three.
"""

from __future__ import annotations

import codecs
import ctypes
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp

from edison.messages import Cancelled, Done, Failed, Job, Progress, Token, Usage
from edison.prompt import Prompt, PromptFormat, StopFilter
from edison.settings import ModelSettings, Settings

Emit = Callable[[object], None]


class Stopped(Exception):
    """The job's cancel flag was seen; `tier` says where."""

    def __init__(self, tier: str) -> None:
        super().__init__(tier)
        self.tier = tier


class PromptTooLong(ValueError):
    pass


@dataclass
class _Progress:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    parts: list[str] = field(default_factory=list)

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens)


def llama_options(model: ModelSettings, threads: int) -> dict[str, Any]:
    """`llama_cpp.Llama` keyword arguments for these settings, in one place so that the
    benchmarks' in-process baseline loads the model exactly as a worker does."""
    return {
        "n_ctx": model.n_ctx,
        "n_batch": model.n_batch,
        "n_ubatch": model.n_ubatch,
        "n_threads": threads,
        "n_threads_batch": model.threads_batch or threads,
        "flash_attn": model.flash_attn,
        "n_gpu_layers": model.n_gpu_layers,
        "verbose": False,
    }


class Engine:
    def __init__(self, model_path: str, settings: Settings, cancelled: Callable[[int], bool]) -> None:
        model = settings.model
        self.llm = llama_cpp.Llama(model_path, **llama_options(model, settings.threads))
        self.n_ctx = self.llm.n_ctx()
        self.prefill_chunk = settings.pool.prefill_chunk
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.format = PromptFormat(
            self.llm.metadata,
            model.prompt_format,
            bos=self._piece(self.llm.token_bos(), special=True).decode("utf-8", "replace"),
            eos=self._piece(self.llm.token_eos(), special=True).decode("utf-8", "replace"),
        )
        self.job_id = 0
        self.reusable = 0  # KV positions filled by whole, aligned prefill chunks
        self._cancelled = cancelled
        # Kept on self: ctypes would free the trampoline while llama.cpp still holds it.
        self._abort = llama_cpp.ggml_abort_callback(lambda _data: self._cancelled(self.job_id))
        llama_cpp.llama_set_abort_callback(self.llm.ctx, self._abort, None)

    def run(self, job: Job, emit: Emit) -> None:
        """Runs one job to exactly one closing message: Done, Cancelled or Failed."""
        self.job_id = job.job_id
        state = _Progress()
        try:
            if job.wedge_s:
                _sleep_in_c(job.wedge_s)
            emit(self._generate(job, state, emit))
        except Stopped as stop:
            emit(Cancelled(job.job_id, "".join(state.parts), stop.tier, state.usage))
        except PromptTooLong as exc:
            emit(Failed(job.job_id, str(exc)))
        except Exception as exc:  # one bad job must never take the worker down
            import traceback

            self._clear()
            emit(Failed(job.job_id, f"generation failed: {exc}", traceback.format_exc()))

    def _generate(self, job: Job, state: _Progress, emit: Emit) -> Done:
        prompt = self._prompt(job)
        tokens = self.llm.tokenize(prompt.text.encode("utf-8"), add_bos=not prompt.special, special=prompt.special)
        state.prompt_tokens = len(tokens)
        if len(tokens) >= self.n_ctx:
            raise PromptTooLong(
                f"the prompt is {len(tokens)} tokens long, but the context holds {self.n_ctx} "
                "(prompt and reply together); shorten the message or the history"
            )
        self._prefill(job, tokens, emit)

        sampling = job.sampling
        self.llm.set_seed(sampling.seed if sampling.seed >= 0 else random.getrandbits(31))
        sampler = self.llm._init_sampler(
            temp=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            repeat_penalty=sampling.repeat_penalty,
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopFilter(prompt.stops + sampling.stop)
        finish, hit = "length", False
        for _ in range(min(sampling.max_tokens, self.n_ctx - len(tokens))):
            if self._cancelled(job.job_id):
                raise Stopped("token")
            token = sampler.sample(self.llm._ctx, -1)
            if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                finish = "stop"
                break
            state.completion_tokens += 1
            text, hit = stops.feed(decoder.decode(self._piece(token)))
            self._emit_text(job, state, text, emit)
            if hit:
                finish = "stop"
                break
            self._eval([token])
        if not hit:  # what the stop filter held back was not a stop string after all
            self._emit_text(job, state, stops.flush() + decoder.decode(b"", final=True), emit)
        return Done(job.job_id, "".join(state.parts), finish, state.usage)

    def _prompt(self, job: Job) -> Prompt:
        if job.messages is not None:
            return self.format.render(list(job.messages))
        return Prompt(job.prompt or "", (), special=False)

    def _prefill(self, job: Job, tokens: list[int], emit: Emit) -> None:
        start = self._reuse_prefix(tokens)
        total = len(tokens)
        chunked = total - start > self.prefill_chunk
        for i in range(start, total, self.prefill_chunk):
            if self._cancelled(job.job_id):
                raise Stopped("chunk")
            self._eval(tokens[i : i + self.prefill_chunk])
            if i + self.prefill_chunk <= total:
                self.reusable = i + self.prefill_chunk
            if chunked:
                emit(Progress(job.job_id, min(i + self.prefill_chunk, total), total))

    def _reuse_prefix(self, tokens: list[int]) -> int:
        """Keeps the KV cache of the whole prefill chunks this prompt shares with the last one.

        Only whole chunks, at the offsets a cold run would use: a batch of another shape rounds
        differently, and on a small model that flips greedy tokens (seen here: "Paris" cold,
        "I am a French citizen" with the last prompt token evaluated alone). So a warm answer
        is byte-identical to a cold one, and long chat histories still skip most of their prefill.
        """
        llm = self.llm
        limit = min(self.reusable, len(tokens) - 1)  # always evaluate one token: fresh logits
        same = 0
        while same < limit and llm.input_ids[same] == tokens[same]:
            same += 1
        keep = same - same % self.prefill_chunk
        if keep and llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            llm.n_tokens = keep
            self.reusable = keep
            return keep
        self._clear()
        return 0

    def _eval(self, tokens: list[int]) -> None:
        try:
            self.llm.eval(tokens)
        except RuntimeError:
            # llama_decode returned non-zero; 2 is "aborted by the callback". Either way the
            # KV cache is in an unknown state: clear it and reuse the context, no reload.
            self._clear()
            if self._cancelled(self.job_id):
                raise Stopped("native") from None
            raise

    def _clear(self) -> None:
        self.reusable = 0
        self.llm.reset()
        # data=False: reset the cells, not the 60 ms memset of the whole buffer inside every stop
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.llm.ctx), False)

    def _emit_text(self, job: Job, state: _Progress, text: str, emit: Emit) -> None:
        if text:
            state.parts.append(text)
            emit(Token(job.job_id, text))

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]


def _sleep_in_c(seconds: float) -> None:
    """Debug-only wedge: a native call that no cancel flag can reach (only the kill tier can).

    A signal (the SIGUSR1 stack dump sent before a kill) ends `usleep` early with EINTR: sleep
    again until the time is up, so the wedge stays deaf until SIGTERM or SIGKILL ends it.
    """
    import time

    libc = ctypes.CDLL(None)
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        libc.usleep(ctypes.c_uint(int(min(left, 1.0) * 1_000_000)))

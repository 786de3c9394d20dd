"""The generation engine inside a worker: one model, one llama context with `slots` sequences,
and continuous batching over them (llama.cpp's server slot scheduler, reduced to its core).

Each `step` builds one `llama_batch`: one token for every decoding sequence, plus prefill
pieces of new prompts within a token budget (smaller while others decode, so a long prompt
never freezes their streams), decodes it, and samples each finished row with that sequence's
own sampler chain. Jobs join and leave between steps.

Cancellation, per sequence, in three places that read the same per-slot flags:
- between steps: a cancelled sequence leaves the batch ("token" once decoding, "chunk" while
  its prompt is read: what bounds a stop on a GPU backend, where llama.cpp does not honour the
  abort callback mid-kernel);
- inside `llama_decode`, through llama.cpp's abort callback ("native", abort.py), which fires
  only when a sequence *in this batch* is cancelled, in prefill and decode steps alike.
  llama.cpp then drops the failed ubatch from the KV cache; each survivor's KV length is read
  back and its missing tokens go into the next step.
Tier 3 (the kill) lives in the pool, for a worker that ignores all of this.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Callable
from typing import Any

import llama_cpp
from llama_cpp import _internals as internals
from llama_cpp import _logger as llama_logger

from edison.kvstore import KVStore, common_prefix, kept_prefix
from edison.protocol import Cancelled, Done, Failed, FailureKind, Job, Progress, Threads, Tier
from edison.settings import ModelSettings, Settings
from edison.worker.abort import BatchAbort
from edison.worker.grammar import BadFormat, Constraint, grammar_text
from edison.worker.prompt import Prompt, PromptFormat, StopFilter
from edison.worker.sequence import Sequence, sampler_chain

Emit = Callable[[object], None]
DECODE_ABORTED = 2  # llama_decode's return value when the abort callback said stop


class PromptTooLong(ValueError):
    pass


def share(threads: int, busy_workers: int) -> int:
    """A worker's threads while `busy_workers` (itself among them) compute: the cores split
    evenly, never more than it was given alone (pool/cpu.py)."""
    return min(threads, max(1, (os.cpu_count() or 1) // max(1, busy_workers)))


def llama_options(model: ModelSettings, threads: int) -> dict[str, Any]:
    """`llama_cpp.Llama` keyword arguments for these settings: the benchmarks' in-process
    baseline loads the model the way a worker does (see `context_params` for the worker)."""
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


def context_params(model: ModelSettings, threads: int, slots: int) -> Any:
    """One context for `slots` sequences, each with the whole `n_ctx` of its own (no unified
    KV buffer: sequences of different chats share no prefix, and each keeps its full context)."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = model.n_ctx * slots
    params.n_seq_max = slots
    params.kv_unified = False
    params.swa_full = model.swa_full  # off: sliding-window layers keep their window only (`Engine.reusable`)
    params.n_batch = model.n_batch + slots  # a prefill piece plus one token per other sequence
    params.n_ubatch = model.n_ubatch
    params.n_threads = threads
    params.n_threads_batch = model.threads_batch or threads
    params.flash_attn_type = (
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if model.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    )
    params.no_perf = True
    return params


class Engine:
    def __init__(self, model_path: str, settings: Settings, flags: Any, base: int, busy_workers: Any = None) -> None:
        model, pool = settings.model, settings.pool
        llama_logger.set_verbose(settings.server.log_level == "debug")  # llama.cpp's own lines: errors only
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = model.n_gpu_layers
        self.model = internals.LlamaModel(path_model=model_path, params=mparams, verbose=False)
        self.ctx = internals.LlamaContext(
            model=self.model, params=context_params(model, settings.threads, pool.slots), verbose=False
        )
        self.vocab = self.model.vocab
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.memory = llama_cpp.llama_get_memory(self.ctx.ctx)
        self.n_swa = llama_cpp.llama_model_n_swa(self.model.model)  # 0: no sliding-window layers
        self.n_ctx = model.n_ctx  # per sequence: prompt and reply of one request
        self.slots = pool.slots
        self.chunk = min(pool.prefill_chunk, model.n_batch)  # prefill tokens per step, alone
        # ... while other sequences decode: a piece that costs about one decode step (~2 ms a
        # prompt token against ~50 ms a step of 4 sequences on 2 cores), so their token gap at
        # most doubles while a new prompt is read, instead of freezing for a 512-token piece.
        self.busy_chunk = max(16, min(self.chunk, model.n_ubatch) // 4)
        self.progress_over = pool.prefill_chunk  # prompts longer than this report their progress
        self.batch = llama_cpp.llama_batch_init(model.n_batch + pool.slots, 0, 1)
        self.format = PromptFormat(
            self.model.metadata(),
            model.prompt_format,
            bos=self._piece(llama_cpp.llama_vocab_bos(self.vocab), special=True).decode("utf-8", "replace"),
            eos=self._piece(llama_cpp.llama_vocab_eos(self.vocab), special=True).decode("utf-8", "replace"),
        )
        self.active: dict[int, Sequence] = {}  # by slot (the pool's cancel-flag index)
        self.cached: list[list[int]] = [[] for _ in range(self.slots)]  # tokens each KV sequence holds
        self.flags, self.base = flags, base  # flags[base + slot] >= job_id: that job is cancelled
        self.abort = BatchAbort(self.ctx.ctx, flags)
        self.busy_workers = busy_workers  # every model's computing workers (pool/cpu.py), or None: alone
        self.threads = (settings.threads, model.threads_batch or settings.threads)  # with the cores to itself
        self.threads_now = self.threads
        self.store = KVStore.open(settings, model_path, self.n_swa)  # saved states outside this process, or None
        if self.store is not None:
            self.store.start_writer()
        self.saved = [0] * self.slots  # how much of each KV sequence's `cached` the store holds
        self.last_used = [-1] * self.slots  # when a job last took each KV sequence (-1: never)
        self.jobs_taken = 0

    def cancelled(self, seq: Sequence) -> bool:
        return self.flags[self.base + seq.job.slot] >= seq.job.job_id

    @property
    def idle(self) -> bool:
        return not self.active

    # Jobs join.

    def add(self, job: Job, emit: Emit) -> None:
        """Takes a job into its slot's sequence, or answers it at once (Failed, or a wedge)."""
        try:
            if job.wedge_s:
                sleep_in_c(job.wedge_s)  # deaf to every flag: the whole worker stops here
            self.active[job.slot] = self._sequence(job)
        except PromptTooLong as exc:
            emit(Failed(job.job_id, str(exc), FailureKind.PROMPT_TOO_LONG))
        except BadFormat as exc:
            emit(Failed(job.job_id, str(exc), FailureKind.BAD_FORMAT))
        except UnicodeEncodeError as exc:
            emit(Failed(job.job_id, f"the prompt cannot be encoded as UTF-8: {exc.reason}", FailureKind.BAD_PROMPT))
        except Exception as exc:  # one bad job must never take the worker down
            import traceback

            emit(Failed(job.job_id, f"generation failed: {exc}", FailureKind.GENERATION_FAILED, traceback.format_exc()))

    def _sequence(self, job: Job) -> Sequence:
        prompt = self._prompt(job)
        tokens = self.model.tokenize(prompt.text.encode("utf-8"), add_bos=not prompt.special, special=prompt.special)
        prompt_tokens, done, resumed = len(tokens), 0, []
        if job.resume is not None:  # the text already streamed, as if the model had just produced it
            resumed = self.model.tokenize(job.resume.text.encode("utf-8"), add_bos=False, special=False)
            tokens += resumed
            done = job.resume.completion_tokens
        if len(tokens) >= self.n_ctx:
            raise PromptTooLong(
                f"the prompt is {len(tokens)} tokens long, but the context holds {self.n_ctx} "
                "(prompt and reply together); shorten the message or the history"
            )
        max_new = min(job.sampling.max_tokens - done, self.n_ctx - len(tokens))
        constraint = None
        if job.format is not None:  # compiled here, between steps: bounded (see grammar.py)
            constraint = Constraint(self.vocab, self.n_vocab, grammar_text(job.format))
            try:
                constraint.replay(resumed)
            except BadFormat:
                constraint.free()
                raise
        seq_id = self._pick_kv_sequence(tokens)
        self.jobs_taken += 1
        self.last_used[seq_id] = self.jobs_taken
        seq = Sequence(
            job, seq_id, tokens, len(tokens), prompt_tokens, max(0, max_new),
            StopFilter(prompt.stops + job.sampling.stop), sampler_chain(job.sampling), self.n_vocab, constraint,
        )
        if common_prefix(self.cached[seq_id], tokens) < len(self.cached[seq_id]):
            self.save(seq_id)  # another conversation takes this sequence: keep what it held
        seq.cached_from = self._restore(seq)
        seq.n_past = seq.reused = self._reuse_prefix(seq)
        if not seq.reused:
            seq.cached_from = ""
        return seq

    def _pick_kv_sequence(self, tokens: list[int]) -> int:
        """The free KV sequence whose history this prompt continues (it shares at least half of
        what the sequence holds: a follow-up turn finds its history wherever its last turn ran);
        else the least recently used one, empty ones first, so that a new conversation does not
        take the slot of another for a few shared tokens of a system prompt."""
        taken = {s.seq_id for s in self.active.values()}
        free = [i for i in range(self.slots) if i not in taken]
        shared = {i: common_prefix(self.cached[i], tokens) for i in free}
        continued = [i for i in free if self.cached[i] and 2 * shared[i] >= len(self.cached[i])]
        if continued:
            return max(continued, key=lambda i: (shared[i], -i))
        return min(free, key=lambda i: (self.last_used[i], i))

    def _prompt(self, job: Job) -> Prompt:
        if job.messages is not None:
            return self.format.render(list(job.messages), job.format)
        return Prompt(job.prompt or "", (), special=False)

    def _restore(self, seq: Sequence) -> str:
        """Where the prompt's cached prefix comes from: the slot's own KV ("slot"), or a saved
        state that shares more of it ("ram", "disk"), restored into the slot's sequence here, in
        a few milliseconds between steps (a cancel lands at the next step, as in a prefill)."""
        if self.store is None:
            return "slot"
        in_slot = self.reusable(seq.seq_id, seq.tokens)
        found = self.store.lookup(seq.tokens, beyond=max(in_slot, self.store.min_tokens))
        state = self.store.load(found[0]) if found else None
        if found is None or state is None:
            return "slot"
        entry = found[0]
        self._drop_kv(seq)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        read = llama_cpp.llama_state_seq_set_data(self.ctx.ctx, buf, len(state), seq.seq_id)
        held = llama_cpp.llama_memory_seq_pos_max(self.memory, seq.seq_id) + 1
        first = llama_cpp.llama_memory_seq_pos_min(self.memory, seq.seq_id)
        if read == 0 or held != len(entry.tokens) or first > entry.first:
            self.store.forget(entry, f"llama.cpp did not take it (read {read} bytes, positions {first} to {held})")
            self._drop_kv(seq)
            return "slot"
        self.cached[seq.seq_id] = entry.tokens.tolist()
        self.saved[seq.seq_id] = len(entry.tokens)
        return entry.tier

    def save(self, seq_id: int) -> None:
        """A KV sequence, with the tokens it holds, into the store, unless the store already has
        most of it. Called right after a prompt's first token is sent (so a request whose worker
        is lost resumes from there), when another conversation takes the sequence, and at a
        clean exit; never on the way to a stop's acknowledgement."""
        held = self.cached[seq_id]
        if self.store is None or len(held) - self.saved[seq_id] < self.store.min_tokens:
            return
        size = llama_cpp.llama_state_seq_get_size(self.ctx.ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        if llama_cpp.llama_state_seq_get_data(self.ctx.ctx, buf, size, seq_id) == size:
            first = max(0, llama_cpp.llama_memory_seq_pos_min(self.memory, seq_id))
            if self.n_swa:  # of the sliding-window layers, a state keeps only its last token's window
                first = max(first, len(held) - self.n_swa)
            self.store.save(held, bytes(buf), first)
            self.saved[seq_id] = len(held)

    def reusable(self, seq_id: int, tokens: list[int]) -> int:
        """How many of `tokens` the KV sequence can keep (`kept_prefix`): without `swa_full` its
        sliding-window layers hold only the positions still in some token's window, so a prompt
        that goes back further reads again, or restores a saved state that ends earlier."""
        first = llama_cpp.llama_memory_seq_pos_min(self.memory, seq_id)
        return kept_prefix(common_prefix(self.cached[seq_id], tokens), len(tokens), first, self.n_swa)

    def _reuse_prefix(self, seq: Sequence) -> int:
        """Keeps the KV cache of every token this prompt shares with what its sequence holds, as
        llama-server does: a returning turn reads only its new words. (Whole chunks only, as
        before, kept warm and cold replies byte-identical, but re-read up to 511 tokens a turn;
        llama.cpp promises no identical bytes across batch shapes anyway.)
        """
        keep = self.reusable(seq.seq_id, seq.tokens)
        if not llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, 0, -1)  # cannot cut there: start over
            keep = 0
        self.cached[seq.seq_id] = seq.tokens[:keep]
        self.saved[seq.seq_id] = min(self.saved[seq.seq_id], keep)
        return keep

    # One step.

    def step(self, emit: Emit) -> None:
        """Drops the cancelled, decodes one batch, samples every sequence that has a fresh row."""
        for seq in list(self.active.values()):
            if self.cancelled(seq):
                self._end(seq, Cancelled(seq.job.job_id, seq.text(), Tier.TOKEN if seq.decoding else Tier.CHUNK, seq.usage()), emit)
        if not self.active:
            return
        self._take_cpu_share(emit)
        rows = self._fill_batch()
        watched = [(self.base + s.job.slot, s.job.job_id) for s, _, _ in rows]
        self.abort.watching(watched, prefill=any(count > 1 for _, _, count in rows))
        status = llama_cpp.llama_decode(self.ctx.ctx, self.batch)
        if status == DECODE_ABORTED:
            self._after_abort(rows, emit)
            return
        if status != 0:
            for seq, _, _ in rows:
                self._drop_kv(seq)
                self._end(seq, Failed(seq.job.job_id, f"generation failed: llama_decode returned {status}"), emit)
            return
        for seq, start, count in rows:
            seq.n_past += count
            self.cached[seq.seq_id] = seq.tokens[: seq.n_past]
            if seq.prompt_len > self.progress_over and seq.n_past <= seq.prompt_len:
                emit(Progress(seq.job.job_id, seq.n_past, seq.prompt_len))
            if seq.n_past == len(seq.tokens):
                self._sample(seq, start + count - 1, emit)
                if seq.n_past == seq.prompt_len:  # the prompt is read and its first token sent
                    self.save(seq.seq_id)

    def _take_cpu_share(self, emit: Emit) -> None:
        """Fewer threads while other workers (another model's) compute too, all of them again when
        they stop: more threads than cores spin at llama.cpp's barriers (pool/cpu.py)."""
        if self.busy_workers is None:
            return
        busy = self.busy_workers.value
        wanted = (share(self.threads[0], busy), share(self.threads[1], busy))
        if wanted != self.threads_now:
            llama_cpp.llama_set_n_threads(self.ctx.ctx, *wanted)
            self.threads_now = wanted
            emit(Threads(*wanted))

    def _fill_batch(self) -> list[tuple[Sequence, int, int]]:
        """(sequence, first batch row, rows) for each sequence in this step's batch.

        The prefill budget goes to the least pending work first, but the rows are written in KV
        sequence order: with a non-unified KV cache llama.cpp splits a batch whose sequence ids
        are out of order into several ubatches (measured in-process: a step of four one-token
        rows took 30 ms in order, 40-51 ms scrambled), and once slots have been reused the
        pending order scrambles the sequence ids.
        """
        decoding = any(s.pending() == 1 for s in self.active.values())
        piece = budget = self.busy_chunk if decoding else self.chunk
        planned = []
        for seq in sorted(self.active.values(), key=lambda s: s.pending()):
            want = seq.pending()
            if want > 1:  # a prefill piece, ending on a multiple of the piece size
                want = min(want, piece - seq.n_past % piece, budget)
                if want <= 0:
                    continue
                budget -= want
            planned.append((seq, want))
        batch, rows, n = self.batch, [], 0
        for seq, want in sorted(planned, key=lambda p: p[0].seq_id):
            for i in range(want):
                pos = seq.n_past + i
                batch.token[n + i] = seq.tokens[pos]
                batch.pos[n + i] = pos
                batch.n_seq_id[n + i] = 1
                batch.seq_id[n + i][0] = seq.seq_id
                batch.logits[n + i] = pos == len(seq.tokens) - 1
            rows.append((seq, n, want))
            n += want
        batch.n_tokens = n
        return rows

    def _after_abort(self, rows: list[tuple[Sequence, int, int]], emit: Emit) -> None:
        """llama.cpp kept the ubatches it finished and dropped the one it was in: read back what
        each sequence holds, end the cancelled ones, and leave the rest to re-submit."""
        for seq, _, count in rows:
            held = llama_cpp.llama_memory_seq_pos_max(self.memory, seq.seq_id) + 1
            if held == seq.n_past + count and held == len(seq.tokens):
                held -= 1  # its row was computed but its logits are lost: decode that token again
                llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, held, -1)
            seq.n_past = min(held, len(seq.tokens))
            self.cached[seq.seq_id] = seq.tokens[: seq.n_past]
            self.saved[seq.seq_id] = min(self.saved[seq.seq_id], seq.n_past)
            if self.cancelled(seq):
                self._end(seq, Cancelled(seq.job.job_id, seq.text(), Tier.NATIVE, seq.usage()), emit)

    def _sample(self, seq: Sequence, row: int, emit: Emit) -> None:
        if seq.max_new <= 0:
            self._finish(seq, "length", emit)
            return
        try:
            token = seq.sample(self.ctx.ctx, row)
        except BadFormat as exc:  # a grammar dead end: this job ends, the batch goes on
            self._end(seq, Failed(seq.job.job_id, str(exc), FailureKind.BAD_FORMAT), emit)
            return
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            self._finish(seq, "stop", emit)
            return
        seq.sampled += 1
        seq.unsent += 1
        seq.max_new -= 1
        text, hit = seq.stops.feed(seq.decoder.decode(self._piece(token)))
        seq.emit_text(text, emit)
        if hit:
            self._finish(seq, "stop", emit, flush=False)
            return
        seq.tokens.append(token)
        if seq.max_new <= 0 or len(seq.tokens) >= self.n_ctx:
            self._finish(seq, "length", emit)

    def _finish(self, seq: Sequence, reason: str, emit: Emit, flush: bool = True) -> None:
        if flush:  # what the stop filter held back was not a stop string after all
            seq.emit_text(seq.stops.flush() + seq.decoder.decode(b"", final=True), emit)
        self._end(seq, Done(seq.job.job_id, seq.text(), reason, seq.usage()), emit)

    def _end(self, seq: Sequence, message: object, emit: Emit) -> None:
        """The sequence leaves the batch; its KV stays for the slot's next prompt to reuse (and is
        saved when another conversation takes it)."""
        del self.active[seq.job.slot]
        seq.free()
        emit(message)

    def _drop_kv(self, seq: Sequence) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq.seq_id, 0, -1)
        self.cached[seq.seq_id] = []
        self.saved[seq.seq_id] = 0

    def close(self) -> None:
        """A clean exit (the pool closed the job pipe): what the slots hold goes to the store,
        and the writes still on their way to disk are waited for, so a restarted service finds
        every conversation."""
        if self.store is not None:
            for seq_id in range(self.slots):
                self.save(seq_id)
            self.store.flush()

    def _piece(self, token: int, special: bool = False) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]


def sleep_in_c(seconds: float) -> None:
    """Debug-only wedge: a native call that no cancel flag can reach (only the kill tier can).

    A signal (the SIGUSR1 stack dump sent before a kill) ends `usleep` early with EINTR: sleep
    again until the time is up, so the wedge stays deaf until SIGTERM or SIGKILL ends it.
    """
    libc = ctypes.CDLL(None)
    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        libc.usleep(ctypes.c_uint(int(min(left, 1.0) * 1_000_000)))

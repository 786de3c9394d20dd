"""The concurrency section of `python -m benchmarks`: many chats on one model copy (issue 14).

Three parts, each its own list of raw trials in the JSON:
- `concurrency`: c = 1, 2, 4, 8 clients at once, each a greedy reply of `concurrency_tokens`
  through the system's streaming `/v1/completions`, for Edison as shipped (config.toml's
  [pool]), Edison with one slot per worker (2 workers x 1 thread, the layout before batching),
  llama-server with 4 slots and with 1, and llama-cpp-python's server. Aggregate streamed
  tokens per second (all replies' tokens over first send -> last token) and each client's
  first token. The systems take turns level by level, round by round, so that whatever else
  the machine does hits them alike; the order rotates every round.
- `slot_stop`: Edison as shipped with every slot but one decoding, and one more request
  stopped (cancel or disconnect) in its prefill or its decode: stop -> `done`, stop -> its slot
  free in /health (the worker sends `Cancelled` only once the sequence has left its batch), the
  others' token gaps around the stop against their median gap, and the pool's kills.
- `slot_memory`: RSS/PSS/USS of a one-worker Edison with 0..S busy slots, for S in
  `memory_slots`: what a busy chat costs, and what a configured slot costs (its KV cache).
"""

from __future__ import annotations

import random
import statistics
import time
from typing import TYPE_CHECKING, Any

from benchmarks.client import SSEStream, StreamTimeout, alive, wait_until
from benchmarks.scenarios import memory_snapshot, warm_up
from benchmarks.systems import Edison, LlamaCppServer, LlamaServer, System, http_json
from benchmarks.workload import counting, long_message
from edison.settings import DEFAULT_CONFIG, load_settings

if TYPE_CHECKING:
    from benchmarks.plan import Plan
    from benchmarks.run import Run

DONE_TIMEOUT = 30.0
GAP_TARGET = (2.0, 0.05)  # the others' longest gap around a stop: at most 2x their median + 50 ms
AFTER_STOP_S = 0.5  # gaps that start this long after the stop still count as "around" it


def shipped_edison(run: Run) -> Edison:
    """Edison as `make run` ships it: config.toml's [pool], threads = cores / workers."""
    shipped = load_settings(DEFAULT_CONFIG, **run.args.overrides).pool
    return Edison(run.model, max(1, run.threads // shipped.workers), run.workdir, workers=shipped.workers,
                  slots=shipped.slots)


def contenders(run: Run) -> list[System]:
    """The systems of the section, as the run's `--systems` allow (Edison always)."""
    model, threads, workdir = run.model, run.threads, run.workdir
    systems: list[System] = [shipped_edison(run), Edison(model, max(1, threads // 2), workdir, workers=2, slots=1)]
    if "llama-server" in run.args.systems:
        systems += [LlamaServer(model, threads, workdir, parallel=4), LlamaServer(model, threads, workdir, parallel=1)]
    if "llama-cpp-server" in run.args.systems:
        systems.append(LlamaCppServer(model, threads, workdir))
    return systems


def steps(plan: Plan, systems: int) -> int:
    p = plan
    stops = 2 * (p.slot_stop_trials + p.slot_disconnect_trials)
    return 1 + p.concurrency_rounds * len(p.concurrency_levels) * systems + stops + len(p.memory_slots)


def section(run: Run) -> None:
    """Runs the three parts; every process it starts is stopped in a `finally`."""
    p = run.plan
    systems = contenders(run)
    run.trials["concurrency_systems"] = [s.label for s in systems]
    run.progress.step("concurrency: starting its systems")
    try:
        run.start(*systems)
        run.described += [{**s.describe(), "section": "concurrency"} for s in systems]  # with their ports
        for round_ in range(p.concurrency_rounds):
            order = systems[round_ % len(systems):] + systems[: round_ % len(systems)]
            for c in p.concurrency_levels:
                for system in order:
                    run.progress.step(f"concurrency: {system.label}, c = {c}, round {round_ + 1}/{p.concurrency_rounds}")
                    record = run.attempt("concurrency", system, concurrent_replies, system, c, run.rng,
                                         p.concurrency_tokens, clients=c)
                    record.update(round=round_, clients=c)
                    run.trials["concurrency"].append(record)
        run.stop(*systems[1:])  # the stop trials want the shipped Edison alone on the machine
        slot_stops(run, systems[0])
    finally:
        run.stop(*systems)
    slot_memory(run)


# Many clients at once.


def concurrent_replies(system: System, clients: int, rng: random.Random, tokens: int) -> dict[str, Any]:
    """`clients` greedy replies of `tokens` tokens, sent back to back; every one must finish.
    For Edison, the workers its pool killed meanwhile (a kill here is a fault, and a slow trial)."""
    kills = system.kills() if isinstance(system, Edison) else None
    streams = [system.open_completion(counting(rng), tokens) for _ in range(clients)]
    try:
        for stream in streams:
            stream.wait_for("done", 60 + 2.0 * tokens * clients)
    finally:
        for stream in streams:
            stream.close()
    replies = [reply(stream) for stream in streams]
    if any(r["ttft_s"] is None for r in replies):
        raise RuntimeError(f"a reply streamed no token: {replies}")
    start = min(s.sent_at for s in streams)
    end = max(s.sent_at + r["last_token_s"] for s, r in zip(streams, replies, strict=True))
    total = sum(r["tokens"] for r in replies)
    return {
        "system": system.label,
        "tokens": total,
        "wall_s": end - start,
        "aggregate_tokens_per_s": total / (end - start),
        "ttft_s": [r["ttft_s"] for r in replies],
        "replies": replies,
        "short_replies": sum(r["tokens"] < tokens for r in replies),  # a stop string, or a cut reply
        "worker_kills": system.kills() - kills if isinstance(system, Edison) and kills is not None else None,
    }


def reply(stream: SSEStream) -> dict[str, Any]:
    """One reply's token count (the server's usage when it says, else its text chunks), first
    and last token times from the send, how it finished, and the usage as the server gave it."""
    stamps = [e.at for e in stream.events if e.name == "token"]
    finish, usage_event = stream.first("finish"), stream.first("usage")
    usage = (finish.data.get("usage") if finish else None) or (usage_event.data if usage_event else None)
    counted = usage.get("completion_tokens") if usage else None
    return {
        "tokens": counted or len(stamps),
        "chunks": len(stamps),
        "ttft_s": stamps[0] - stream.sent_at if stamps else None,
        "last_token_s": stamps[-1] - stream.sent_at if stamps else 0.0,
        "finish_reason": finish.data["finish_reason"] if finish else None,
        "usage": usage,
    }


# One stop among busy slots.


def slot_stops(run: Run, edison: Edison) -> None:
    """Round-robin over (phase, way), so that each gets the machine in every state alike."""
    p = run.plan
    queue = [(phase, how, p.slot_stop_trials if how == "cancel" else p.slot_disconnect_trials)
             for phase in ("prefill", "decode") for how in ("cancel", "disconnect")]
    for round_ in range(max(n for _, _, n in queue)):
        for phase, how, count in queue:
            if round_ >= count:
                continue
            run.progress.step(f"stop 1 of {edison.slots} busy slots: {phase} {how} {round_ + 1}/{count}")
            record = run.attempt("slot stop", edison, slot_stop_trial, edison, phase, how, run.rng, p,
                                 phase=phase, how=how)
            run.trials["slot_stop"].append(record)


def slot_stop_trial(edison: Edison, phase: str, how: str, rng: random.Random, plan: Plan) -> dict[str, Any]:
    """Every slot but one decoding a long reply; a request takes the last slot and is stopped in
    `phase`. The others must keep streaming: their longest gap around the stop is compared with
    their median gap over the trial, and no worker may be killed."""
    record: dict[str, Any] = {"system": edison.label, "phase": phase, "how": how}
    kills = edison.kills()
    others = [edison.open(counting(rng)) for _ in range(edison.workers * edison.slots - 1)]
    victim: SSEStream | None = None
    try:
        for stream in others:
            stream.wait_for("token", 60, count=8)  # decoding steadily before the victim arrives
        message = long_message(rng, plan.slot_stop_prompt_tokens) if phase == "prefill" else counting(rng)
        victim = edison.open(message)
        pid = record["pid"] = edison.compute_pid(victim)
        request_id = victim.wait_for("init", DONE_TIMEOUT).data["request_id"]
        if phase == "decode":
            victim.wait_for("token", 60, count=rng.randint(*plan.slot_stop_tokens))
        else:
            record["delay_s"] = rng.uniform(*plan.slot_stop_delay_s)
            time.sleep(max(0.0, victim.sent_at + record["delay_s"] - time.monotonic()))
        t0 = time.monotonic()
        if how == "cancel":
            edison.cancel(victim)
        else:
            victim.disconnect()
        record["phase_at_stop"] = "decode" if victim.count("token", before=t0) else "prefill"
        record["prefill_progress_before_stop"] = victim.count("progress", before=t0)
        if how == "cancel":
            done = victim.wait_for("done", DONE_TIMEOUT)
            record["cancel_to_done_s"] = done.at - t0
            record["done"] = {k: v for k, v in done.data.items() if k != "response"}
        released = _slot_released(edison, request_id, DONE_TIMEOUT)
        record["stop_to_slot_free_s"] = released - t0 if released is not None else None
        end = max(t0 + 1.0, (released or t0) + 1.0)
        time.sleep(max(0.0, end - time.monotonic()))
        record.update(_gaps(others, victim.sent_at, t0, released or t0, end))
        record["others_ok"] = all(s.first("done") is None and s.count("token", before=end) > 0 for s in others)
        record["same_worker"] = alive(pid) and pid in edison.health()["workers"]["pids"]
        record["worker_kills"] = edison.kills() - kills
    finally:
        _end_all(edison, others + ([victim] if victim else []))
    return record


def _slot_released(edison: Edison, request_id: str, timeout: float) -> float | None:
    """When /health?verbose=1 (polled every ~5 ms) first shows no slot holding the request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        details = edison.health(verbose=True)["worker_details"]
        if not any(request_id in w["request_ids"] for w in details):
            return time.monotonic()
        time.sleep(0.005)
    return None


def _gaps(others: list[SSEStream], sent: float, t0: float, released: float, end: float) -> dict[str, Any]:
    """The other streams' gaps between tokens: the longest one under way at the stop or starting
    within AFTER_STOP_S of it (or of the slot's release), their median over the whole trial, and
    the medians before the victim was sent (decode only) and after its slot was free."""
    spans = [(a.at, b.at) for s in others for tokens in [_tokens(s, end)] for a, b in zip(tokens, tokens[1:])]
    if not spans:
        raise RuntimeError("the other streams sent no tokens during the trial")
    around = [b - a for a, b in spans if b >= t0 and a <= max(t0, released) + AFTER_STOP_S]
    before = [b - a for a, b in spans if b <= sent]
    after = [b - a for a, b in spans if a >= released]
    median = statistics.median(b - a for a, b in spans)
    longest = max(around, default=None)
    return {
        "others_median_gap_s": median,
        "others_longest_gap_around_stop_s": longest,
        "others_longest_gap_before_stop_s": max((b - a for a, b in spans if sent <= a and b < t0), default=None),
        "others_median_gap_before_victim_s": statistics.median(before) if before else None,
        "others_median_gap_after_free_s": statistics.median(after) if after else None,
        "gap_within_target": longest is not None and longest <= GAP_TARGET[0] * median + GAP_TARGET[1],
        "others_token_times": [[round(e.at - t0, 4) for e in _tokens(s, end)] for s in others],
    }


def _tokens(stream: SSEStream, end: float) -> list[Any]:
    return [e for e in stream.events if e.name == "token" and e.at <= end]


def _end_all(edison: Edison, streams: list[SSEStream]) -> None:
    """Cancels what still runs, waits for every `done`, and for the pool to be empty again."""
    for stream in streams:
        if stream.disconnected_at is None and stream.first("done") is None:
            try:
                edison.cancel(stream)
            except (OSError, StreamTimeout):
                pass
    for stream in streams:
        if stream.disconnected_at is None:
            try:
                stream.wait_for("done", DONE_TIMEOUT)
            except StreamTimeout:
                pass
        stream.close()
    wait_until(lambda: http_json(edison.port, "GET", "/health")[1].get("active_requests") == 0, timeout=DONE_TIMEOUT)


# Memory per slot.


def slot_memory(run: Run) -> None:
    """A one-worker Edison per slot count, its worker measured idle and then with 1..S busy slots."""
    for slots in run.plan.memory_slots:
        run.progress.step(f"memory: edison, 1 worker x {slots} slots")
        edison = Edison(run.model, run.threads, run.workdir, workers=1, slots=slots)
        try:
            run.start(edison)
            warm_up(edison, slots, run.rng)
            run.trials["slot_memory"] += busy_memory(edison, run.rng)
        except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
            run.errors.append({"section": "slot memory", "system": edison.label, "error": f"{type(exc).__name__}: {exc}"})
        finally:
            run.stop(edison)


def busy_memory(edison: Edison, rng: random.Random) -> list[dict[str, Any]]:
    streams: list[SSEStream] = []
    rows = []
    try:
        for busy in range(edison.slots + 1):
            if busy:
                streams.append(edison.open(counting(rng)))
                streams[-1].wait_for("token", 60, count=4)
            [worker] = [(role, pid) for role, pid in edison.processes().items() if role.startswith("worker")]
            for row in memory_snapshot(edison.label, dict([worker])):
                rows.append({**row, "slots": edison.slots, "busy": busy})
    finally:
        _end_all(edison, streams)
    return rows

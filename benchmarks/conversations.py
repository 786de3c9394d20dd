"""The conversations section of `python -m benchmarks`: chats that come back (issue #22).

Three parts, each its own list of raw trials in the JSON:
- `conversations`: N chats of `conversation_turns` turns each through the system's streaming
  `/v1/chat/completions` (each server renders the messages with its own chat format), for
  Edison as shipped (config.toml's [pool]), llama-server `-np 4` at its defaults (its RAM
  prompt cache included) and llama-cpp-python's server, as `--systems` allows. A chat opens
  with a distinct ~2k-token message; each later turn sends the whole history (the assistant
  replies as received) and a short new message. Turns go chat 1 turn 1, chat 2 turn 1, ...,
  chat 1 turn 2, ..., at most `conversation_in_flight` at once. Then the last chats (as many
  as may be in flight) send one more turn together, with a longer reply: the aggregate decode
  speed while the slots serve returning chats. First turns and returning turns are timed apart.
- `conversation_kill`: Edison only. A ~6k-token chat whose worker is SIGKILLed a few tokens
  into its reply; Edison resumes it on a replacement worker: kill -> the next token on the same
  stream, and the final usage.
- `conversation_restart`: Edison only. A ~6k-token chat, its second turn on the same service,
  then a restart of the service and its third turn: what a returning chat pays after a restart.
Usage dicts go into the JSON as the servers send them (a `cached_tokens` field, when a server
gives one, says how much of a prompt it did not read again).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from benchmarks.client import SSEStream, wait_until
from benchmarks.concurrency import reply, shipped_edison
from benchmarks.scenarios import replacement_ready, warm_up
from benchmarks.systems import Edison, LlamaCppServer, LlamaServer, System, metric
from benchmarks.workload import conversation_opening, follow_up

if TYPE_CHECKING:
    from benchmarks.plan import Plan
    from benchmarks.run import Run

TURN_TIMEOUT = 600.0  # a single-slot server reads up to 3 queued ~2k prompts before a turn's own
KILL_REPLY_TOKENS = 128  # long enough to be under way when its worker is killed
KILL_AFTER_TOKENS = 4
# A token the worker sent just before it died may still be on its way; a replacement needs far
# longer than this to start a process and load the model, so later tokens are the resumed ones.
IN_FLIGHT_S = 0.1
STEADY_MIN_S = 0.5  # a shorter window of all replies streaming at once gives no steady speed

Message = dict[str, str]


def contenders(run: Run) -> list[System]:
    """Edison as shipped, then the others the run's `--systems` name, with 4 slots where they take it."""
    systems: list[System] = [shipped_edison(run)]
    if "llama-server" in run.args.systems:
        systems.append(LlamaServer(run.model, run.threads, run.workdir, parallel=4))
    if "llama-cpp-server" in run.args.systems:
        systems.append(LlamaCppServer(run.model, run.threads, run.workdir))
    return systems


def steps(plan: Plan, systems: int) -> int:
    return 1 + len(plan.conversation_counts) * systems + 2 * plan.conversation_fault_trials


def section(run: Run) -> None:
    """Runs the three parts; every process it starts is stopped in a `finally`."""
    p = run.plan
    systems = contenders(run)
    run.trials["conversations_systems"] = [s.label for s in systems]
    run.progress.step("conversations: starting its systems")
    try:
        run.start(*systems)
        run.described += [{**s.describe(), "section": "conversations"} for s in systems]
        for system in systems:
            warm_up(system, 1, run.rng)  # the first request of a fresh process pays for its page-ins
        for i, count in enumerate(p.conversation_counts):
            for system in systems[i % len(systems):] + systems[: i % len(systems)]:  # each goes first in turn
                run.progress.step(f"conversations: {system.label}, {count} chats")
                record = run.attempt("conversations", system, conversation_run, system, count, run.rng, p,
                                     conversations=count)
                record.update(conversations=count)
                run.trials["conversations"].append(record)
        edison = systems[0]
        run.stop(*systems[1:])  # the kill and restart trials want Edison alone on the machine
        for i in range(p.conversation_fault_trials):
            run.progress.step(f"conversations: worker SIGKILL in a long chat {i + 1}/{p.conversation_fault_trials}")
            run.trials["conversation_kill"].append(
                run.attempt("conversation kill", edison, kill_trial, edison, run.rng, p))
            run.progress.step(f"conversations: service restart in a long chat {i + 1}/{p.conversation_fault_trials}")
            run.trials["conversation_restart"].append(
                run.attempt("conversation restart", edison, restart_trial, edison, run.rng, p))
    finally:
        run.stop(*systems)


# Many chats, interleaved.


def conversation_run(system: System, count: int, rng: random.Random, plan: Plan) -> dict[str, Any]:
    """`count` chats turn by turn, then the decode phase; for Edison, the workers its pool killed
    meanwhile (a kill here is a fault)."""
    p = plan
    kills = system.kills() if isinstance(system, Edison) else None
    openings = [conversation_opening(rng, p.conversation_opening_tokens) for _ in range(count)]
    chats: list[list[Message]] = [[] for _ in range(count)]
    start = time.monotonic()
    order = [(chat, turn) for turn in range(p.conversation_turns) for chat in range(count)]
    turns = run_turns(system, chats, openings, order, p.conversation_in_flight, p.conversation_reply_tokens, start)
    together = list(range(count))[-min(p.conversation_in_flight, count):]  # the chats whose turns ran last
    burst = [(chat, p.conversation_turns) for chat in together]
    decode = run_turns(system, chats, openings, burst, len(burst), p.conversation_decode_tokens, start)
    return {
        "system": system.label,
        "turns": p.conversation_turns,
        "in_flight": p.conversation_in_flight,
        "requests": turns,
        "first_ttft_s": [r["ttft_s"] for r in turns if r["turn"] == 0],
        "returning_ttft_s": [r["ttft_s"] for r in turns if r["turn"] > 0],
        "wall_s": max(r["sent_s"] + r["done_s"] for r in turns),
        "decode_requests": decode,
        "decode_ttft_s": [r["ttft_s"] for r in decode],
        **decode_speed(decode),
        "worker_kills": system.kills() - kills if isinstance(system, Edison) and kills is not None else None,
    }


def run_turns(
    system: System, chats: list[list[Message]], openings: list[str], order: list[tuple[int, int]],
    in_flight: int, max_tokens: int, start: float,
) -> list[dict[str, Any]]:
    """Sends the (chat, turn)s in `order`, at most `in_flight` at once; the next one waits for a
    free place and for its chat's previous reply, which joins the chat's history as received."""
    pending = deque(order)
    running: dict[SSEStream, tuple[int, int, list[Message]]] = {}
    records: list[dict[str, Any]] = []
    try:
        while pending or running:
            busy = {chat for chat, _, _ in running.values()}
            while pending and len(running) < in_flight and pending[0][0] not in busy:
                chat, turn = pending.popleft()
                message = openings[chat] if turn == 0 else follow_up(turn)
                messages = [*chats[chat], {"role": "user", "content": message}]
                running[system.open_chat(messages, max_tokens)] = (chat, turn, messages)
                busy.add(chat)
            finished = [stream for stream in running if stream.closed.is_set()]
            for stream in finished:
                chat, turn, messages = running.pop(stream)
                records.append(_turn_record(stream, chat, turn, messages, start))
                chats[chat] = [*messages, {"role": "assistant", "content": reply_text(stream)}]
                stream.close()
            if not finished:
                if any(time.monotonic() - stream.sent_at > TURN_TIMEOUT for stream in running):
                    raise TimeoutError(f"a turn took over {TURN_TIMEOUT:.0f} s: {[running[s][:2] for s in running]}")
                time.sleep(0.005)
    finally:
        for stream in running:
            stream.close()
    return records


def _turn_record(stream: SSEStream, chat: int, turn: int, messages: list[Message], start: float) -> dict[str, Any]:
    """One turn's timings, usage and reply. A reply with no text still had a first token, the one
    that ended it: its first token is timed by the finish chunk (`ended_at_once`)."""
    done, finish = stream.first("done"), stream.first("finish")
    if done is None or not done.data.get("ok"):
        error = stream.first("http_error") or done
        raise RuntimeError(f"chat {chat} turn {turn} failed: {error.data if error else stream.error!r} {stream.names()[-5:]}")
    record = {
        "chat": chat,
        "turn": turn,
        "sent_s": stream.sent_at - start,
        "done_s": done.at - stream.sent_at,
        "history_messages": len(messages) - 1,
        "prompt_chars": sum(len(m["content"]) for m in messages),
        **reply(stream),
        "ended_at_once": False,
        "token_s": [round(e.at - stream.sent_at, 4) for e in stream.events if e.name == "token"],
        "reply": reply_text(stream),
    }
    if record["ttft_s"] is None and finish is not None:
        record.update(ttft_s=finish.at - stream.sent_at, ended_at_once=True)
    return record


def reply_text(stream: SSEStream) -> str:
    finish = stream.first("finish")
    return "".join(e.data["t"] for e in stream.events if e.name == "token") + (finish.data["text"] if finish else "")


def decode_speed(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Every streamed token of the chats sent together over their first token -> last token (a
    later chat's prefill counts: that is what its returning costs), and the steady speed while
    all of them were streaming (last first token -> first last token), if that lasted long enough."""
    started = [r for r in requests if r["token_s"]]
    speed: dict[str, Any] = {"decode_tokens": sum(r["tokens"] for r in started), "decode_span_s": None,
                             "decode_tokens_per_s": None, "steady_span_s": None, "steady_tokens_per_s": None}
    if not started:
        return speed
    first = min(r["sent_s"] + r["token_s"][0] for r in started)
    last = max(r["sent_s"] + r["token_s"][-1] for r in started)
    if last > first:
        # The window opens on a token: the tokens inside it are all but that one.
        speed.update(decode_span_s=last - first, decode_tokens_per_s=(speed["decode_tokens"] - 1) / (last - first))
    opens = max(r["sent_s"] + r["token_s"][0] for r in started)
    closes = min(r["sent_s"] + r["token_s"][-1] for r in started)
    if len(started) == len(requests) and closes - opens >= STEADY_MIN_S:
        # Text chunks inside the window, scaled to tokens by each reply's own tokens per chunk.
        inside = sum(sum(opens < r["sent_s"] + t <= closes for t in r["token_s"]) * r["tokens"] / r["chunks"]
                     for r in started)
        speed.update(steady_span_s=closes - opens, steady_tokens_per_s=inside / (closes - opens))
    return speed


# Edison only: a worker killed, a service restarted.


def kill_trial(edison: Edison, rng: random.Random, plan: Plan) -> dict[str, Any]:
    """A ~6k-token chat with a long reply; a few tokens in, its worker is SIGKILLed, and Edison
    resumes the request on a replacement by itself: kill -> the next token on the same stream."""
    record: dict[str, Any] = {"system": edison.label}
    resumed = metric(edison.port, "edison_resumed_total")
    message = conversation_opening(rng, plan.conversation_long_tokens)
    stream = edison.open_chat([{"role": "user", "content": message}], KILL_REPLY_TOKENS)
    try:
        pid = record["pid"] = edison.compute_pid(stream)
        stream.wait_for("token", TURN_TIMEOUT, count=KILL_AFTER_TOKENS)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        ready = replacement_ready(edison, old=pid, timeout=120)
        record["kill_to_ready_s"] = ready - t0 if ready is not None else None
        stream.wait_for("done", TURN_TIMEOUT)
        tokens = [e.at for e in stream.events if e.name == "token"]
        after = [at for at in tokens if at > t0 + IN_FLIGHT_S]
        record["tokens_before_kill"] = sum(at <= t0 for at in tokens)
        record["tokens_in_flight_at_kill"] = sum(t0 < at <= t0 + IN_FLIGHT_S for at in tokens)
        record["kill_to_next_token_s"] = after[0] - t0 if after else None
        record.update(_turn_record(stream, 0, 0, [{"role": "user", "content": message}], stream.sent_at))
        record["resumed"] = metric(edison.port, "edison_resumed_total") - resumed
        wait_until(lambda: edison.health()["active_requests"] == 0, timeout=30)
    finally:
        stream.close()
    return record


def restart_trial(edison: Edison, rng: random.Random, plan: Plan) -> dict[str, Any]:
    """A ~6k-token chat: turn 1 (cold), turn 2 on the same service (what its slot's cache gives),
    then a graceful restart (SIGTERM, as `systemctl restart` does; a crash is the kill trial's
    business) and turn 3: what a returning chat pays after a restart."""
    opening = conversation_opening(rng, plan.conversation_long_tokens)
    chat: list[Message] = []
    turns = []
    record: dict[str, Any] = {"system": edison.label}
    for turn in range(3):
        if turn == 2:
            t0 = time.monotonic()
            edison.stop()
            edison.launch()
            edison.wait_ready()
            record["restart_s"] = time.monotonic() - t0
        messages = [*chat, {"role": "user", "content": opening if turn == 0 else follow_up(turn)}]
        stream = edison.open_chat(messages, plan.conversation_reply_tokens)
        try:
            stream.wait_for("done", TURN_TIMEOUT)
            turns.append(_turn_record(stream, 0, turn, messages, stream.sent_at))
        finally:
            stream.close()
        chat = [*messages, {"role": "assistant", "content": reply_text(stream)}]
    record["requests"] = turns
    record["cold_ttft_s"], record["warm_ttft_s"], record["after_restart_ttft_s"] = (t["ttft_s"] for t in turns)
    return record

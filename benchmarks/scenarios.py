"""One trial of each benchmark. Each returns a plain dict of raw measurements (seconds from
`time.monotonic()`), which goes into the JSON as it is; `report` turns them into rows.

Every latency starts at the moment the client acts: just before the cancel POST is sent,
or just before the socket is shut down.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from benchmarks.client import CpuProbe, SSEStream, StreamTimeout, wait_until
from benchmarks.systems import Edison, InProcess, System, http_json
from benchmarks.workload import SAMPLING, STOPS, counting, long_message, transcript

DONE_TIMEOUT = 30.0  # for anything that should end within a second or two


def _stop(system: System, stream: SSEStream, how: str) -> float:
    t0 = time.monotonic()
    if how == "cancel":
        system.cancel(stream)
    else:
        stream.disconnect()
    return t0


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stop_trial(
    system: System, phase: str, how: str, rng: random.Random, moment: tuple[float, float] | tuple[int, int], cap: float
) -> dict[str, Any]:
    """Start a generation, stop it at a random moment in `phase` (decode or prefill) by `how`
    (cancel or disconnect); time cancel -> `done` and cancel -> the computing process idle.
    `moment`: the range of streamed tokens (decode) or seconds after the send (prefill) to stop at.
    Gives up `cap` seconds after the stop: the sample is then "at least cap" (`capped`)."""
    message = counting(rng) if phase == "decode" else long_message(rng)
    record: dict[str, Any] = {"system": system.label, "phase": phase, "how": how}
    tiers_before = edison_tier_counts(system) if isinstance(system, Edison) else {}
    stream = system.open(message)
    try:
        pid = system.compute_pid(stream)
        record["pid"] = pid
        if stream.first("init"):
            record["request_id"] = stream.first("init").data.get("request_id")  # type: ignore[union-attr]
        with CpuProbe(pid) as probe:
            if phase == "decode":
                record["tokens_before"] = rng.randint(*moment)
                stream.wait_for("token", 60, count=record["tokens_before"])
            else:
                record["delay_s"] = rng.uniform(*moment)
                time.sleep(max(0.0, stream.sent_at + record["delay_s"] - time.monotonic()))
            t0 = _stop(system, stream, how)
            record["stop_after_send_s"] = t0 - stream.sent_at
            record["tokens_seen_before_stop"] = stream.count("token", before=t0)
            record["prefill_progress_before_stop"] = stream.count("progress", before=t0)
            record["busy_before_cores"] = probe.rate(t0 - 0.5, t0)
            if how == "cancel":
                try:
                    done = stream.wait_for("done", cap)
                    record["cancel_to_done_s"] = done.at - t0
                    record["done"] = {k: v for k, v in done.data.items() if k != "response"}
                except StreamTimeout:
                    record["cancel_to_done_s"] = None
            idle = probe.idle_after(t0, timeout=max(0.0, cap - (time.monotonic() - t0)))
            record["cancel_to_idle_s"] = idle
            record["capped"] = idle is None or (how == "cancel" and record["cancel_to_done_s"] is None)
            record["cap_s"] = cap
    finally:
        stream.close()
    if isinstance(system, Edison):
        record["worker_killed"] = not _alive(record["pid"])
        record["tier"] = stop_tier(system, record, tiers_before)
    return record


def recovery_trial(system: System, rng: random.Random, delay: tuple[float, float], cap: float) -> dict[str, Any]:
    """A client leaves a long prompt at a random moment of its prefill and at once sends a short
    one, as a user who gives up and asks something else: disconnect -> the short request's first
    token. A server that keeps computing the abandoned prompt makes the new one wait for it.
    Gives up `cap` seconds after the disconnect (`capped`)."""
    record: dict[str, Any] = {"system": system.label}
    stream = system.open(long_message(rng))
    follow: SSEStream | None = None
    try:
        record["delay_s"] = rng.uniform(*delay)
        time.sleep(max(0.0, stream.sent_at + record["delay_s"] - time.monotonic()))
        t0 = stream.disconnect()
        follow = system.open(counting(rng), max_tokens=16)
        try:
            record["stop_to_next_token_s"] = follow.wait_for("token", cap).at - t0
        except StreamTimeout:
            record["stop_to_next_token_s"] = None
        record["capped"] = record["stop_to_next_token_s"] is None
        record["cap_s"] = cap
    finally:
        stream.close()
        if follow:
            follow.close()
    return record


def edison_tier_counts(system: Edison) -> dict[str, float]:
    """`edison_cancel_tier_total` by tier, from /metrics: which tier ended a stop whose client
    left (a disconnect gets no `done` to carry `stopped_by`)."""
    status, text = http_json(system.port, "GET", "/metrics")
    counts: dict[str, float] = {}
    for match in re.finditer(r'^edison_cancel_tier_total\{tier="(\w+)"\} ([\d.e+]+)$', str(text), re.M):
        counts[match.group(1)] = float(match.group(2))
    return counts


def stop_tier(system: System, record: dict[str, Any], before: dict[str, float]) -> str | None:
    """The tier that ended this stop: `stopped_by` of its `done`, else the /metrics counter that moved."""
    if record.get("done", {}).get("stopped_by"):
        return record["done"]["stopped_by"]
    if not isinstance(system, Edison):
        return None
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        moved = [t for t, n in edison_tier_counts(system).items() if n > before.get(t, 0.0)]
        if moved:
            return moved[0]
        time.sleep(0.02)
    return None


def wedge_trial(system: Edison, kind: str, rng: random.Random) -> dict[str, Any]:
    """A worker that cannot answer: SIGSTOPped mid-decode, or asleep in a C call deaf to its
    flag (`debug_wedge_s`). Only the kill tier can stop it. Times cancel -> `done`, the old
    worker's death -> a replacement ready, and cancel -> the next request's first token
    (the next request is sent the moment `done` arrives, as a user would)."""
    extra = {"debug_wedge_s": 30} if kind == "native" else {}
    record: dict[str, Any] = {"system": system.label, "kind": kind}
    stream = system.open(counting(rng), **extra)
    follow: SSEStream | None = None
    try:
        pid = record["pid"] = system.compute_pid(stream)
        with CpuProbe(pid) as probe:
            if kind == "sigstop":
                stream.wait_for("token", 60, count=rng.randint(2, 12))
                os.kill(pid, signal.SIGSTOP)
            time.sleep(rng.uniform(0.1, 0.4))
            t0 = _stop(system, stream, "cancel")
            done = stream.wait_for("done", DONE_TIMEOUT)
            record["cancel_to_done_s"] = done.at - t0
            record["done"] = {k: v for k, v in done.data.items() if k != "response"}
            follow = system.open(counting(rng), max_tokens=32)
            ready_at = replacement_ready(system, old=pid, timeout=60)
            first = follow.wait_for("token", 60)
            follow.disconnect()  # the first token is all this trial wants of it
            wait_until(lambda: probe.gone_at is not None, timeout=10)
            record["cancel_to_killed_s"] = probe.gone_at - t0 if probe.gone_at else None
            record["kill_to_ready_s"] = ready_at - probe.gone_at if probe.gone_at and ready_at else None
            record["cancel_to_next_token_s"] = first.at - t0
        wait_until(lambda: system.health()["active_requests"] == 0, timeout=DONE_TIMEOUT)
    finally:
        stream.close()
        if follow:
            follow.close()
    return record


def replacement_ready(system: Edison, old: int, timeout: float) -> float | None:
    """When /health first shows a ready worker that is not `old` (polled every 10 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in system.health(verbose=True)["worker_details"]:
            if worker["pid"] != old and worker["state"] == "ready":  # starting, ready or killing
                return time.monotonic()
        time.sleep(0.01)
    return None


def throughput_run(target: System | InProcess, rng: random.Random, tokens: int) -> dict[str, Any]:
    """One greedy reply of `tokens` tokens: time to first token, and decode tokens/s after it."""
    message = counting(rng)
    if isinstance(target, InProcess):
        options = {**SAMPLING, "stop": STOPS}
        reply = target.ask({"prompt": transcript(message), "max_tokens": tokens, "options": options})
        times, count = reply["token_at"], len(reply["token_at"])
        ttft = times[0] if times else None
    else:
        stream = target.open(message, max_tokens=tokens)
        try:
            done = stream.wait_for("done", 120)
        finally:
            stream.close()
        token_events = [e.at for e in stream.events if e.name == "token"]
        usage = done.data.get("usage") or {}
        count = usage.get("completion_tokens") or len(token_events)  # Edison may merge held-back text
        ttft = token_events[0] - stream.sent_at if token_events else None
        times = token_events
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    return {
        "system": target.label,
        "tokens": count,
        "ttft_s": ttft,
        "decode_tokens_per_s": (count - 1) / span if span > 0 else None,
    }


def prefill_run(target: System | InProcess, rng: random.Random, tokens: int, known: int) -> dict[str, Any]:
    """A fresh prompt of about `tokens` tokens and a one-token greedy reply, timed from the send
    to the end of the reply: the prefill speed as a client sees it. `known`: the prompt's length
    for a system that does not report it."""
    message = long_message(rng, tokens)
    if isinstance(target, InProcess):
        options = {**SAMPLING, "stop": STOPS}
        reply = target.ask({"prompt": transcript(message), "max_tokens": 1, "options": options})
        seconds, prompt_tokens = reply["elapsed"], target.ask({"tokenize": transcript(message)})["tokens"]
    else:
        stream = target.open(message, max_tokens=1)
        try:
            done = stream.wait_for("done", 600)
        finally:
            stream.close()
        if not done.data.get("ok"):
            raise RuntimeError(f"prefill failed: {done.data}")
        seconds, prompt_tokens = done.at - stream.sent_at, (done.data.get("usage") or {}).get("prompt_tokens")
    prompt_tokens = prompt_tokens or known
    return {
        "system": target.label,
        "prompt_tokens": prompt_tokens,
        "prefill_s": seconds,
        "prefill_tokens_per_s": prompt_tokens / seconds,
    }


def memory_snapshot(label: str, processes: dict[str, int]) -> list[dict[str, Any]]:
    rows = []
    for role, pid in processes.items():
        info = psutil.Process(pid).memory_full_info()
        rows.append({"system": label, "role": role, "pid": pid, "rss": info.rss, "pss": info.pss, "uss": info.uss})
    return rows


def warm_up(system: System, n: int, rng: random.Random) -> None:
    """`n` short replies at once, so that every worker has run a generation."""
    streams = [system.open(counting(rng), max_tokens=32) for _ in range(n)]
    try:
        for stream in streams:
            stream.wait_for("done", 120)
    finally:
        for stream in streams:
            stream.close()


@dataclass
class LagProbe:
    """Event-loop lag measured from outside: the round trip of GET /health on one kept-alive
    connection, every `interval` s. The web process answers it on its event loop, so a loop
    blocked by pipe reads or bookkeeping shows up as a slow answer. Each sample is labelled
    with `state` at the time it was taken."""

    port: int
    interval: float = 0.02
    state: str = "idle"
    samples: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-lag", daemon=True)

    def __enter__(self) -> LagProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self._stop.is_set():
            state, start = self.state, time.monotonic()
            try:
                conn.request("GET", "/health")
                conn.getresponse().read()
                self.samples.append((state, time.monotonic() - start))
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self._stop.wait(self.interval)


def load_trial(system: Edison, lag: LagProbe, rng: random.Random) -> dict[str, Any]:
    """Every worker busy decoding and the queue full: one more request is refused (503), then
    a queued request and a running one are cancelled. The worker of the running one moves on
    to the next queued request at once, so its CPU never idles: only cancel -> `done` is timed."""
    record: dict[str, Any] = {"system": system.label, "workers": system.workers, "queue": system.queue_size}
    running: list[SSEStream] = []
    queued: list[SSEStream] = []
    try:
        running = [system.open(counting(rng)) for _ in range(system.workers)]
        for stream in running:
            stream.wait_for("token", 60)
        queued = [system.open(counting(rng)) for _ in range(system.queue_size)]
        for stream in queued:
            stream.wait_for("queued", DONE_TIMEOUT)
        lag.state = "loaded"
        refused = system.open(counting(rng))
        try:
            answer = refused.wait_for("http_error", DONE_TIMEOUT)
            record["reject_status"] = answer.data["status"]
            record["reject_s"] = answer.at - refused.sent_at
        finally:
            refused.close()
        time.sleep(rng.uniform(0.3, 0.8))  # let the lag probe sample the loaded service
        for name, pool in (("queued", queued), ("running", running)):
            victim = pool.pop(rng.randrange(len(pool)))
            t0 = _stop(system, victim, "cancel")
            record[f"{name}_cancel_to_done_s"] = victim.wait_for("done", DONE_TIMEOUT).at - t0
            victim.close()
            time.sleep(rng.uniform(0.2, 0.5))
    finally:
        lag.state = "draining"
        for stream in running + queued:
            try:
                _stop(system, stream, "cancel")
            except (OSError, StreamTimeout):
                pass
        for stream in running + queued:
            try:
                stream.wait_for("done", DONE_TIMEOUT)
            except StreamTimeout:
                pass
            stream.close()
        wait_until(lambda: http_json(system.port, "GET", "/health")[1].get("active_requests") == 0, timeout=30)
        lag.state = "idle"
    return record

"""`python -m benchmarks.soak`: many mixed cycles against ONE Edison service, then a leak check
(issue 13, item 7).

Each cycle is one scenario, picked at random: completions (1..S at once, `/chat/stream` and
`/v1/completions`), a cancel or a disconnect while queued (every slot busy), in prefill or in
decode (beside requests that must finish), and now and then a SIGKILL of the worker running
requests, which must all be resumed and end `ok` with their text whole. After every cycle the
pool's bookkeeping must be empty again. Before the first counted cycle (after a warm-up of one
cycle of each kind) and after the last, it records open fds, threads and RSS of the web process
and each worker (psutil), the service's children, /health's bookkeeping and the /metrics
counters. Exit code 1 on any problem: a leaked fd, thread, process or request entry, RSS growth
of 5 % or more, a kill, crash or respawn that no fault asked for, or a broken stream contract.

    python -m benchmarks.soak --cycles 100        # CI size, a few minutes on 2 cores
    python -m benchmarks.soak --cycles 1000 --publish

Kills are spaced at least crash_window_s / 2 apart, so that the injected crashes never reach
the restart budget (the back-off has tests of its own), and none falls in the last tenth of the
cycles, so that the worker measured last has run jobs like the one measured first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks import BENCH_MODEL
from benchmarks.client import SSEStream, StreamTimeout, wait_until
from benchmarks.run import HERE, Progress, _override, edison_model, machine_info
from benchmarks.systems import Edison, metric
from benchmarks.workload import counting, long_message
from edison.settings import DEFAULT_CONFIG, ModelSettings, load_settings

DONE_TIMEOUT = 120.0  # generous: the soak counts broken promises, not slowness
RSS_GROWTH_LIMIT = 0.05
COUNTERS = ("edison_worker_kills_total", "edison_worker_crashes_total", "edison_worker_respawns_total",
            "edison_resumed_total")
KINDS = ("complete", "queued cancel", "queued disconnect", "prefill cancel", "prefill disconnect",
         "decode cancel", "decode disconnect")


class ContractError(Exception):
    """A stream or the pool broke a promise; the cycle is recorded as a problem."""


class Soak:
    def __init__(self, edison: Edison, rng: random.Random, prompt_tokens: int, kill_gap_s: float) -> None:
        self.edison, self.rng, self.prompt_tokens, self.kill_gap_s = edison, rng, prompt_tokens, kill_gap_s
        self.capacity = edison.workers * edison.slots
        self.kills_injected = 0
        self.last_kill = 0.0

    # Scenarios: each raises ContractError when the service breaks a promise.

    def run(self, kind: str) -> None:
        if kind == "kill":
            self.kill()
        elif kind == "complete":
            self.complete()
        else:
            phase, how = kind.split()
            self.stop(phase, how)

    def complete(self) -> None:
        streams = [self._open_short() for _ in range(self.rng.randint(1, self.capacity))]
        self._expect_ok(streams)

    def stop(self, phase: str, how: str) -> None:
        fillers: list[SSEStream] = []
        companions = [self._open_short() for _ in range(self.rng.randint(0, 2) if phase != "queued" else 0)]
        if phase == "queued":  # every slot busy, so that the victim waits in the queue
            fillers = [self.edison.open(counting(self.rng)) for _ in range(self.capacity)]
            for stream in fillers:
                stream.wait_for("token", DONE_TIMEOUT)
        victim = self.edison.open(long_message(self.rng, self.prompt_tokens) if phase == "prefill" else counting(self.rng))
        try:
            if phase == "queued":
                victim.wait_for("queued", DONE_TIMEOUT)
            elif phase == "prefill":
                victim.wait_for("init", DONE_TIMEOUT)
                time.sleep(self.rng.uniform(0.05, 0.6))
            else:
                victim.wait_for("token", DONE_TIMEOUT, count=self.rng.randint(1, 8))
            if how == "cancel":
                answer = self.edison.cancel(victim)
                if answer.get("status") != "cancelled":
                    raise ContractError(f"cancel of a live request answered {answer}")
                done = self._one_done(victim)
                if not done.data.get("stopped") and not done.data.get("ok"):
                    raise ContractError(f"cancelled request ended neither stopped nor ok: {done.data}")
            else:
                victim.disconnect()
            for stream in fillers:
                self.edison.cancel(stream)
            for stream in fillers:
                self._one_done(stream)
            self._expect_ok(companions)
        finally:
            for stream in [victim, *fillers, *companions]:
                stream.close()

    def kill(self) -> None:
        """SIGKILL the worker running 1..S requests: each resumes elsewhere and ends ok, text whole."""
        streams = [self.edison.open(counting(self.rng), max_tokens=32) for _ in range(self.rng.randint(1, self.edison.slots))]
        try:
            streams[0].wait_for("token", DONE_TIMEOUT, count=self.rng.randint(1, 6))
            pid = self.edison.compute_pid(streams[0])
            os.kill(pid, signal.SIGKILL)
            self.kills_injected += 1
            self.last_kill = time.monotonic()
            self._expect_ok(streams)
            if not wait_until(lambda: self._ready_without(pid), timeout=DONE_TIMEOUT, interval=0.05):
                raise ContractError(f"no replacement for the killed worker {pid} within {DONE_TIMEOUT} s")
        finally:
            for stream in streams:
                stream.close()

    def _ready_without(self, pid: int) -> bool:
        workers = self.edison.health()["workers"]
        return workers["ready"] >= self.edison.workers and pid not in workers["pids"]

    def can_kill(self) -> bool:
        return time.monotonic() - self.last_kill >= self.kill_gap_s

    # Streams.

    def _open_short(self) -> SSEStream:
        if self.rng.random() < 0.5:
            return self.edison.open(counting(self.rng), max_tokens=self.rng.choice((16, 32)))
        return self.edison.open_completion(counting(self.rng), self.rng.choice((16, 32)))

    def _one_done(self, stream: SSEStream) -> Any:
        """The stream's final event (Edison's `done`, or /v1's `finish`) once the body has ended."""
        final = "finish" if stream.path.startswith("/v1/") else "done"
        try:
            event = stream.wait_for(final, DONE_TIMEOUT)
        except StreamTimeout as exc:
            raise ContractError(f"no final event: {exc}") from None
        stream.closed.wait(5)
        if stream.count(final) != 1 or stream.error:
            raise ContractError(f"{stream.count(final)} final events, error {stream.error!r}: {stream.names()}")
        return event

    def _expect_ok(self, streams: list[SSEStream]) -> None:
        for stream in streams:
            event = self._one_done(stream)
            text = "".join(e.data["t"] for e in stream.events if e.name == "token")
            if event.name == "finish":
                if event.data["finish_reason"] not in ("stop", "length"):
                    raise ContractError(f"/v1 completion ended {event.data}")
            elif not event.data.get("ok") or event.data.get("response") != text:
                raise ContractError(f"completion not ok, or its response is not its tokens: {event.data} vs {text!r}")

    # Bookkeeping.

    def settle(self, timeout: float = 30.0) -> dict[str, Any]:
        """Waits for an empty pool with every worker ready; returns /health's bookkeeping."""
        def empty() -> bool:
            h = self.edison.health()
            return (h["active_requests"], h["queue"], h["slots"]["busy"]) == (0, 0, 0) \
                and h["workers"]["ready"] == self.edison.workers

        if not wait_until(empty, timeout=timeout, interval=0.02):
            raise ContractError(f"bookkeeping not empty {timeout:g} s after the cycle: {self.book()}")
        return self.book()

    def book(self) -> dict[str, Any]:
        h = self.edison.health()
        return {"active_requests": h["active_requests"], "queue": h["queue"], "slots_busy": h["slots"]["busy"],
                "workers_ready": h["workers"]["ready"]}


def snapshot(edison: Edison, soak: Soak) -> dict[str, Any]:
    """fds, threads, RSS of the web process, each worker and any other child; bookkeeping; counters."""
    web = psutil.Process(edison._server_pid())
    workers = {pid: role for role, pid in edison.processes().items() if role.startswith("worker")}
    processes = {"web": _process(web)}
    for child in web.children():
        role = workers.get(child.pid) or f"child {child.name()}"
        processes[role] = _process(child)
    try:
        health = soak.settle()
    except ContractError:
        health = soak.book()  # reported as it is: the verdict fails on it
    return {"processes": processes, "children": len(web.children()), "health": health,
            "counters": {name: metric(edison.port, name) for name in COUNTERS}}


FD_FLOOR_S = 2.0  # fds are counted at their lowest over this long


def _process(p: psutil.Process) -> dict[str, Any]:
    """The fd count is the floor over FD_FLOOR_S: a connection the server is still closing, or a
    pipe of a worker being replaced, is open for milliseconds; a leaked fd stays in every sample."""
    floor: dict[str, Any] | None = None
    until = time.monotonic() + FD_FLOOR_S
    while floor is None or time.monotonic() < until:
        sample = {"fds": p.num_fds(), "fd_kinds": _fd_kinds(p.pid)}
        if floor is None or sample["fds"] < floor["fds"]:
            floor = sample
        time.sleep(0.05)
    with p.oneshot():
        return {"pid": p.pid, **floor, "threads": p.num_threads(), "rss": p.memory_info().rss}


def _fd_kinds(pid: int) -> dict[str, int]:
    """What the open fds are (socket, pipe, eventpoll, a file), so a count that moved says what moved."""
    kinds: Counter[str] = Counter()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return {}
    for name in names:
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue  # closed meanwhile
        kinds[target.split(":[")[0] if ":[" in target else target] += 1
    return dict(kinds)


def verdict(before: dict[str, Any], after: dict[str, Any], unasked: dict[str, float], problems: list[Any]) -> dict[str, Any]:
    found = [f"{len(problems)} cycles broke a promise"] if problems else []
    for role, b in before["processes"].items():
        a = after["processes"].get(role)
        if a is None:
            found.append(f"{role} is gone")
            continue
        for key in ("fds", "threads"):
            if a[key] > b[key]:
                found.append(f"{role}: {key} {b[key]} -> {a[key]}" + (f" ({_grown(b, a)})" if key == "fds" else ""))
        if a["rss"] >= b["rss"] * (1 + RSS_GROWTH_LIMIT):
            found.append(f"{role}: RSS {b['rss'] / 2**20:.0f} -> {a['rss'] / 2**20:.0f} MiB")
    if after["children"] > before["children"]:
        found.append(f"children {before['children']} -> {after['children']}")
    found += [f"{k} not empty: {v}" for k, v in after["health"].items() if k != "workers_ready" and v]
    found += [f"unasked {k}: {v:g}" for k, v in unasked.items() if v > 0]
    return {"ok": not found, "problems": found}


def _grown(before: dict[str, Any], after: dict[str, Any]) -> str:
    b, a = before.get("fd_kinds", {}), after.get("fd_kinds", {})
    return ", ".join(f"{kind} {b.get(kind, 0)} -> {n}" for kind, n in sorted(a.items()) if n > b.get(kind, 0))


def plan_kinds(cycles: int, kill_every: int, rng: random.Random) -> list[str]:
    """The cycle kinds, in order: a kill every `kill_every` cycles (none in the last tenth),
    the rest drawn evenly from KINDS."""
    kinds = [rng.choice(KINDS) for _ in range(cycles)]
    for i in range(kill_every - 1, int(cycles * 0.9), kill_every):
        kinds[i] = "kill"
    return kinds


def _cycle(runner: Soak, kind: str, index: int) -> dict[str, Any]:
    """One cycle and the settling after it; a broken promise is recorded, and the soak goes on
    unless the pool does not even empty itself again (`fatal`)."""
    t = time.monotonic()
    record: dict[str, Any] = {"cycle": index, "kind": kind}
    try:
        runner.run(kind)
        runner.settle()
    except (ContractError, StreamTimeout, OSError) as exc:
        record["problem"] = f"{type(exc).__name__}: {exc}"
        print(f"\nsoak: cycle {index + 1} ({kind}): {exc}", file=sys.stderr)
        try:
            runner.settle(timeout=60.0)  # the next cycle starts from an empty pool
        except ContractError as again:
            record["problem"] += f"; then {again}"
            record["fatal"] = True
    record["s"] = round(time.monotonic() - t, 3)
    return record


def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model = edison_model(_model_path(), args.threads, args.overrides)
    shipped = load_settings(DEFAULT_CONFIG, **args.overrides).pool
    pool = {k: v for k, v in asdict(shipped).items() if k not in ("workers", "slots", "queue_size")}
    edison = Edison(model, max(1, args.threads // shipped.workers), workdir, workers=shipped.workers,
                    slots=shipped.slots, queue_size=shipped.queue_size, pool=pool)
    rng = random.Random(args.seed)
    kinds = plan_kinds(args.cycles, args.kill_every, rng)
    progress = Progress(len(kinds) + len(KINDS) + 2)
    counts: Counter[str] = Counter()
    cycles: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        edison.launch()
        edison.wait_ready()
        runner = Soak(edison, rng, args.prompt_tokens, kill_gap_s=shipped.crash_window_s / 2)
        for kind in (*KINDS, "kill"):  # warm-up: every path once, before the baseline
            progress.step(f"warm-up: {kind}")
            warm = _cycle(runner, kind, -1)
            if "problem" in warm:
                cycles.append(warm)
        time.sleep(1.0)  # the warm-up ends with a kill: let the respawn settle, as before `after`
        before = snapshot(edison, runner)
        runner.kills_injected = 0
        progress.step("baseline taken")
        for i, kind in enumerate(kinds):
            if kind == "kill" and not runner.can_kill():
                kind = rng.choice(KINDS)  # too soon after the last one: see the module docstring
            progress.step(f"cycle {i + 1}: {kind}")
            record = _cycle(runner, kind, i)
            counts[kind] += 1
            cycles.append(record)
            if record.get("fatal"):
                break
        time.sleep(1.0)  # let closed connections and reaped workers settle
        after = snapshot(edison, runner)
        progress.step("after taken")
    finally:
        edison.stop()
        progress.close()
    delta = {k: after["counters"][k] - before["counters"][k] for k in COUNTERS}
    injected = runner.kills_injected
    unasked = {
        "kills": delta["edison_worker_kills_total"],  # the soak injects no wedge: no kill is asked for
        "crashes": delta["edison_worker_crashes_total"] - injected,
        "respawns": delta["edison_worker_respawns_total"] - injected,
    }
    problems = [c for c in cycles if "problem" in c]
    return {"before": before, "after": after, "counters_delta": delta, "faults": {"sigkill": injected},
            "unasked": unasked, "counts": dict(counts), "cycles": cycles, "problems": problems,
            "verdict": verdict(before, after, unasked, problems), "duration_s": round(time.monotonic() - started, 1),
            "edison": edison.describe()}


def _model_path() -> str:
    from edison.model import resolve_model_path

    return str(resolve_model_path(ModelSettings(path=BENCH_MODEL)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=100)
    parser.add_argument("--kill-every", type=int, default=20, help="a worker SIGKILL every N cycles (default %(default)s)")
    parser.add_argument("--prompt-tokens", type=int, default=1500, help="the prompt stopped in its prefill")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads in all (default %(default)s)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--publish", action="store_true", help="also write RESULTS.md's Soak section and SOAK.json")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one of Edison's settings, e.g. --set pool.slots=2")
    args = parser.parse_args(argv)
    args.overrides = dict(_override(item) for item in args.set)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = args.out / f"soak-logs-{stamp}"
    workdir.mkdir(parents=True)
    for signum in (signal.SIGTERM, signal.SIGHUP):  # every `finally` runs, and the service is stopped
        signal.signal(signum, lambda n, _f: sys.exit(128 + n))
    model = edison_model(_model_path(), args.threads, args.overrides)
    meta = machine_info(model, args.threads, args.overrides)
    result = soak(args, workdir)
    e = result["edison"]
    meta.update(cycles=args.cycles, seed=args.seed, kill_every=args.kill_every, prompt_tokens=args.prompt_tokens,
                finished=datetime.now().strftime("%Y-%m-%d %H:%M"), duration_s=result["duration_s"], logs=str(workdir),
                layout=f"{e['workers']} worker(s) x {e['threads']} thread(s) x {e['slots']} slots")
    result["meta"] = meta
    path = args.out / f"soak-{stamp}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print_summary(result, path)
    if args.publish:
        publish(result)
    return 0 if result["verdict"]["ok"] else 1


def print_summary(result: dict[str, Any], path: Path) -> None:
    print(f"{'process':<24} {'fds':>12} {'threads':>12} {'RSS MiB':>14}")
    for role, b in result["before"]["processes"].items():
        a = result["after"]["processes"].get(role, {})
        print(f"{role:<24} {b['fds']:>5} -> {a.get('fds', '-'):<4} {b['threads']:>5} -> {a.get('threads', '-'):<4} "
              f"{b['rss'] / 2**20:>6.0f} -> {a.get('rss', 0) / 2**20:<6.0f}")
    print(f"bookkeeping before {result['before']['health']}\n            after  {result['after']['health']}")
    print(f"cycles {result['counts']}\nfaults injected {result['faults']}; counters moved {result['counters_delta']}; "
          f"unasked {result['unasked']}")
    for problem in result["problems"]:
        print(f"PROBLEM: {problem}")
    verdict_ = result["verdict"]
    print(("PASS" if verdict_["ok"] else "FAIL: " + "; ".join(verdict_["problems"])) + f"\nJSON: {path}")


def publish(result: dict[str, Any]) -> None:
    from benchmarks import report_concurrency as rc
    from benchmarks.report import NOTES

    target = HERE / "RESULTS.md"
    previous = target.read_text() if target.exists() else f"# Benchmark results\n\n{NOTES}\n\n(none yet)\n"
    target.write_text(rc.replace_soak(previous, rc.soak_markdown(result), NOTES))
    (HERE / "SOAK.json").write_text(json.dumps(result, indent=1, default=str))  # committed beside RESULTS.md
    print(f"Published the soak in {target} and {HERE / 'SOAK.json'}")


if __name__ == "__main__":
    raise SystemExit(main())

"""Stop latency through HAProxy beside the same without it, in one run: `python -m benchmarks.proxy`.

Two Edison instances (one worker each) behind a real HAProxy configured by
`edison haproxy-config` (edison/haproxy.py). Every trial is `scenarios.stop_trial`, the same one
the main benchmark runs: start a generation, stop it at a random moment of its decode or of a
~6,000-token prefill, by `POST /chat/cancel` or by hanging up, and time the stop -> `done` and
the stop -> the worker's CPU idle. Direct and through-the-proxy trials alternate, trial by trial,
so whatever else runs on the machine hits both alike; the direct ones alternate between the two
instances, as the proxy's do.

A last row times the hop alone: a bare `POST /chat/cancel` of an unknown id, direct and through
the proxy, many times, with no model computing. The raw samples go to
benchmarks/results-proxy.json; the table is printed (markdown).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import random
import shutil
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import BENCH_MODEL
from benchmarks import scenarios
from benchmarks.client import SSEStream, wait_until
from benchmarks.run import edison_model
from benchmarks.systems import Edison, Process, System, free_port, http_json
from benchmarks.workload import LONG_REPLY
from edison.haproxy import Address, ProxyConfig, render
from edison.settings import ModelSettings

HERE = Path(__file__).resolve().parent
CAP_S = 10.0  # a stop that takes longer is recorded as "at least 10 s"
DECODE_TOKENS = (3, 30)  # stop after this many streamed tokens
PREFILL_DELAY_S = (1.0, 5.0)  # stop this long after the send: inside a ~14 s prefill
HOPS_PER_TRIAL = 10  # round trips of a bare cancel per stop trial: they are cheap
# (phase, how): the four stop rows each path gets.
KINDS = (("decode", "cancel"), ("decode", "disconnect"), ("prefill", "cancel"), ("prefill", "disconnect"))


class HAProxy:
    """`haproxy -db -f <rendered config>` in front of `backends`, ended by pid."""

    def __init__(self, backends: list[Edison], workdir: Path) -> None:
        self.backends = backends
        self.workdir = workdir
        self.port, self.stats_port = free_port(), free_port()
        self.process: Process | None = None

    def start(self) -> None:
        config = ProxyConfig(
            bind=Address("127.0.0.1", self.port),
            backends=tuple(Address("127.0.0.1", b.port) for b in self.backends),
            stats=Address("127.0.0.1", self.stats_port),
            socket=str(self.workdir / "haproxy.sock"),
            user="",
        )
        path = self.workdir / "haproxy.cfg"
        path.write_text(render(config))
        binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
        self.process = Process([binary, "-db", "-f", str(path)], self.workdir / "haproxy.log")
        self.process.start()
        if not wait_until(self.all_up, timeout=30, interval=0.1):
            raise TimeoutError(f"HAProxy never saw every instance up:\n{self.process.log_tail()}")

    def stats(self) -> list[dict[str, str]]:
        _, text = http_json(self.stats_port, "GET", "/;csv")
        return list(csv.DictReader(io.StringIO(str(text).lstrip("# "))))

    def all_up(self) -> bool:
        try:
            rows = [r for r in self.stats() if r["pxname"] == "edison_instances" and r["svname"].startswith("edison")]
        except (OSError, ValueError):
            return False
        return len(rows) == len(self.backends) and all(r["status"] == "UP" for r in rows)

    def stop(self) -> None:
        if self.process:
            self.process.stop(grace=5.0)


class ViaProxy(System):
    """The same two instances, reached through the proxy: what a client of a two-box setup sees."""

    name = "via-haproxy"

    def __init__(self, proxy: HAProxy, model: ModelSettings, threads: int, workdir: Path) -> None:
        super().__init__(model, threads, workdir)
        self.proxy = proxy
        self.port = proxy.port

    @property
    def label(self) -> str:
        return "through HAProxy"

    def open(self, message: str, max_tokens: int = LONG_REPLY, **extra: Any) -> SSEStream:
        return SSEStream(self.port, "/chat/stream", {"message": message, "mode": f"n{max_tokens}", **extra})

    def cancel(self, stream: SSEStream) -> dict[str, Any]:
        request_id = stream.wait_for("init", 30).data["request_id"]
        return http_json(self.port, "POST", "/chat/cancel", {"request_id": request_id})[1]

    def compute_pid(self, stream: SSEStream) -> int:
        request_id = stream.wait_for("init", 30).data["request_id"]
        found: list[int] = []

        def running() -> bool:
            found[:] = [w["pid"] for b in self.proxy.backends for w in b.health(verbose=True)["worker_details"]
                        if request_id in w["request_ids"]]
            return bool(found)

        if not wait_until(running, timeout=30, interval=0.01):
            raise TimeoutError(f"request {request_id} never reached a worker behind the proxy")
        return found[0]


def haproxy_version() -> str:
    import subprocess

    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    return subprocess.run([binary, "-v"], capture_output=True, text=True).stdout.split("\n")[0]


def settle(backends: list[Edison], timeout: float = 30.0) -> None:
    """Until both instances are idle: every trial starts from the same state."""

    def idle() -> bool:
        return all(not (h := b.health())["workers"]["busy"] and not h["active_requests"] for b in backends)

    if not wait_until(idle, timeout=timeout, interval=0.05):
        raise TimeoutError("the instances did not settle")


def trial(system: System, phase: str, how: str, rng: random.Random) -> dict[str, Any]:
    moment = DECODE_TOKENS if phase == "decode" else PREFILL_DELAY_S
    record = scenarios.stop_trial(system, phase, how, rng, moment, CAP_S)
    record["path"] = "proxy" if isinstance(system, ViaProxy) else "direct"
    record["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return record


def hop_trial(port: int, path: str, rng: random.Random) -> dict[str, Any]:
    """One `POST /chat/cancel` of an id nobody runs (`not_found`): the cost of the extra hop
    alone, without a model in the measurement."""
    request_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    t0 = time.monotonic()
    status, body = http_json(port, "POST", "/chat/cancel", {"request_id": request_id})
    elapsed = time.monotonic() - t0
    assert status == 200 and body["status"] == "not_found", body
    return {"phase": "http", "how": "cancel", "path": path, "round_trip_s": elapsed, "loadavg_1m": round(os.getloadavg()[0], 2)}


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from edison.model import resolve_model_path

    model = edison_model(str(resolve_model_path(ModelSettings(path=BENCH_MODEL))), args.threads, {})
    rng = random.Random(args.seed)
    backends = []
    for name in ("a", "b"):
        (workdir / name).mkdir()
        backends.append(Edison(model, args.threads, workdir / name, workers=1))
    proxy = HAProxy(backends, workdir)
    records: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    try:
        for b in backends:
            b.launch()
        for b in backends:
            b.wait_ready()
        proxy.start()
        via = ViaProxy(proxy, model, args.threads, workdir)
        for b in (*backends, via, via):  # one warm generation per worker, both paths
            settle(backends)
            scenarios.warm_up(b, 1, rng)
        total = len(KINDS) * args.trials * 2
        for i in range(args.trials):
            for phase, how in KINDS:
                pair: list[System] = [backends[i % 2], via]
                for system in pair if i % 2 == 0 else pair[::-1]:
                    settle(backends)
                    try:
                        records.append(trial(system, phase, how, rng))
                    except Exception as exc:  # noqa: BLE001 - counted and shown; the run goes on
                        errors.append({"path": system.label, "phase": phase, "how": how, "error": repr(exc)})
                    done = len(records) + len(errors)
                    print(f"\r{done}/{total} trials", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        for i in range(args.trials * HOPS_PER_TRIAL):
            order = [(backends[i % 2].port, "direct"), (proxy.port, "proxy")]
            for port, path in order if i % 2 == 0 else order[::-1]:
                records.append(hop_trial(port, path, rng))
        retries = {r["svname"]: r.get("wretr") for r in proxy.stats() if r["pxname"] == "edison_instances"}
    finally:
        proxy.stop()
        for b in backends:
            b.stop(grace=5.0)
    return {
        "meta": {
            "finished": datetime.now().strftime("%Y-%m-%d %H:%M"),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "workers_per_instance": 1,
            "trials_per_row": args.trials,
            "seed": args.seed,
            "haproxy": haproxy_version(),
            "proxy_retries": retries,
            "loadavg_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        },
        "trials": records,
        "errors": errors,
    }


def nearest_rank(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(value: float) -> str:
    return f"{value * 1000:.2f} ms" if value < 0.01 else f"{value * 1000:.1f} ms"


def rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (phase, stop, timed-until, path), with the proxy's added p50."""
    out = []
    for phase, how in (("http", "cancel"), *KINDS):
        if phase == "http":
            metrics = [("`not_found` (no model)", "round_trip_s")]
        elif how == "cancel":
            metrics = [("done", "cancel_to_done_s"), ("CPU idle", "cancel_to_idle_s")]
        else:
            metrics = [("CPU idle", "cancel_to_idle_s")]
        for until, key in metrics:
            p50: dict[str, float] = {}
            for path in ("direct", "proxy"):
                records = [r for r in results["trials"] if r["phase"] == phase and r["how"] == how and r["path"] == path]
                values = [r[key] for r in records if r.get(key) is not None]
                capped = sum(r.get(key) is None for r in records)
                if not values:
                    continue
                p50[path] = nearest_rank(values, 50)
                out.append({
                    "phase": phase, "stop": how, "until": until, "path": path, "n": len(values), "capped": capped,
                    "p50": p50[path], "p90": nearest_rank(values, 90), "p99": nearest_rank(values, 99), "max": max(values),
                    "proxy_adds_p50": p50["proxy"] - p50["direct"] if path == "proxy" and "direct" in p50 else None,
                })
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| phase | stop → until | path | n | p50 | p90 | p99 | max | proxy adds (p50) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        adds = "" if r["proxy_adds_p50"] is None else f"{r['proxy_adds_p50'] * 1000:+.2f} ms"
        capped = f" (+{r['capped']} capped)" if r["capped"] else ""
        lines.append(f"| {r['phase']} | {r['stop']} → {r['until']} | {r['path']} | {r['n']}{capped} | {ms(r['p50'])} | "
                     f"{ms(r['p90'])} | {ms(r['p99'])} | {ms(r['max'])} | {adds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per row and path (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads per instance (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results-proxy.json", help="the raw JSON (default: %(default)s)")
    parser.add_argument("--from-json", type=Path, help="measure nothing: print the table of a saved run")
    args = parser.parse_args(argv)
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        if args.seed is None:
            args.seed = random.SystemRandom().randrange(2**31)
        workdir = HERE / "results" / f"proxy-logs-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        workdir.mkdir(parents=True)
        started = time.monotonic()
        results = run(args, workdir)
        results["meta"]["duration_s"] = round(time.monotonic() - started, 1)
        results["meta"]["logs"] = str(workdir)
        results["summary"] = rows(results)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"Raw samples: {args.out}")
    print(markdown(rows(results)))
    for error in results["errors"]:
        print(f"FAILED: {error}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

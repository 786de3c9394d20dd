"""The settings experiment behind Edison's [model] defaults: Edison's own `Engine` (the code a
worker runs, abort callback included) in this process, no pool, no HTTP, once per candidate.

For each candidate it measures the prefill of a fresh ~6,000-token prompt (wall time and this
process's CPU time), greedy decode speed, and the abort latency inside `llama_decode`: the
cancel flag is set from another thread at a random moment of a prefill (anywhere in it: a
stop late in a long prompt costs more, see `Bench.abort`), and the time until the engine
reports `Cancelled` is what a stop costs before any IPC. Candidates are measured
interleaved, round by round, so that whatever else the machine does hits them alike.

    python -m benchmarks.throughput                       # the candidates below, 3 rounds
    python -m benchmarks.throughput --rounds 1 --only fa-on-ub256,fa-off-ub512
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import BENCH_MODEL
from benchmarks.workload import COUNTING, SAMPLING, STOPS, long_message, nonce, transcript
from edison.protocol import Cancelled, Done, Failed, Job, Token
from edison.settings import Sampling
from edison.worker.engine import Engine
from edison.model import resolve_model_path
from edison.settings import DEFAULT_CONFIG, ModelSettings, load_settings

HERE = Path(__file__).resolve().parent

# name -> overrides of config.toml (dotted keys, as `python -m benchmarks --set` takes them).
CANDIDATES: dict[str, dict[str, Any]] = {
    "fa-off-ub512": {"model.flash_attn": False, "model.n_ubatch": 512},  # llama-cpp-python's defaults
    "fa-on-ub512": {"model.flash_attn": True, "model.n_ubatch": 512},
    "fa-on-ub256": {"model.flash_attn": True, "model.n_ubatch": 256},
    "fa-on-ub128": {"model.flash_attn": True, "model.n_ubatch": 128},
    # llama-server's batch: 2,048 tokens per llama_decode (a prefill chunk must be as long).
    "fa-on-b2048": {"model.flash_attn": True, "model.n_batch": 2048, "model.n_ubatch": 512, "pool.prefill_chunk": 2048},
}


class Bench:
    """One candidate's engine and its cancel flag (a job id: "cancel every job <= this")."""

    def __init__(self, model_path: str, threads: int, overrides: dict[str, Any]) -> None:
        fixed = {"model.path": model_path, "model.n_ctx": 8192, "model.threads": threads, "pool.workers": 1,
                 "pool.slots": 1}
        self.settings = load_settings(DEFAULT_CONFIG, **{**overrides, **fixed})
        self.flags = multiprocessing.RawArray("q", 1)  # the pool's cancel flag for the one slot
        self.engine = Engine(model_path, self.settings, self.flags, 0)
        self.job_id = 0

    def job(self, prompt: str, max_tokens: int) -> Job:
        self.job_id += 1
        sampling = Sampling(**SAMPLING, max_tokens=max_tokens, stop=tuple(STOPS))
        return Job(self.job_id, f"bench-{self.job_id}", sampling, prompt=prompt)

    def prefill(self, rng: random.Random) -> dict[str, float]:
        job = self.job(transcript(long_message(rng)), max_tokens=1)
        cpu, start = time.process_time(), time.monotonic()
        closing = self._run(job)
        assert isinstance(closing, Done), closing
        wall = time.monotonic() - start
        tokens = closing.usage.prompt_tokens
        return {"prompt_tokens": tokens, "prefill_s": wall, "prefill_tok_s": tokens / wall,
                "prefill_cpu_s": time.process_time() - cpu}

    def decode(self, rng: random.Random, tokens: int = 128) -> dict[str, float]:
        job = self.job(transcript(f"{nonce(rng)} {COUNTING}"), max_tokens=tokens)
        stamps: list[float] = []
        closing = self._run(job, on_token=lambda: stamps.append(time.monotonic()))
        assert isinstance(closing, Done), closing
        count = closing.usage.completion_tokens
        return {"decode_tokens": count, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}

    def abort(self, rng: random.Random, prefill_s: float) -> dict[str, Any]:
        """A prefill cancelled at a random moment of it: flag set -> `Cancelled` from the engine.

        The moment matters: before each `llama_decode` computes, llama.cpp fills the attention
        masks (prompt tokens x cached positions) on one thread, with no abort check, so a stop
        late in a long prompt waits longer. `prefill_s`: how long this candidate's prefill takes."""
        job = self.job(transcript(long_message(rng)), max_tokens=1)
        delay = rng.uniform(0.2, 0.95 * prefill_s)
        flagged: list[float] = []

        def cancel() -> None:
            flagged.append(time.monotonic())
            self.flags[0] = job.job_id

        timer = threading.Timer(delay, cancel)
        timer.start()
        closing = self._run(job)
        ended = time.monotonic()
        timer.join()
        if not isinstance(closing, Cancelled):
            return {"abort_ms": None, "note": "finished before the cancel"}
        return {"abort_ms": (ended - flagged[0]) * 1000, "tier": closing.tier.value, "at": delay / prefill_s}

    def _run(self, job: Job, on_token: Any = None) -> object:
        closing: list[object] = []

        def emit(message: object) -> None:
            if isinstance(message, Token):
                if on_token:
                    on_token()
            elif isinstance(message, (Done, Cancelled, Failed)):
                closing.append(message)

        self.engine.add(job, emit)
        while not self.engine.idle:
            self.engine.step(emit)
        return closing[0]

    def close(self) -> None:
        self.engine.ctx.close()
        self.engine.model.close()


def measure(model_path: str, threads: int, names: list[str], rounds: int, aborts: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for round_ in range(rounds):
        for name in names:
            print(f"round {round_ + 1}/{rounds}: {name}", flush=True)
            bench = Bench(model_path, threads, CANDIDATES[name])
            try:
                base = {"candidate": name, "round": round_}
                bench.decode(rng, tokens=8)  # warm-up
                prefill = bench.prefill(rng)
                records.append({**base, **prefill})
                records.append({**base, **bench.decode(rng)})
                records += [{**base, **bench.abort(rng, prefill["prefill_s"])} for _ in range(aborts)]
            finally:
                bench.close()
    return records


def summary(records: list[dict[str, Any]], names: list[str]) -> str:
    def values(name: str, key: str) -> list[float]:
        return [r[key] for r in records if r["candidate"] == name and r.get(key) is not None]

    def p50(xs: list[float]) -> float:
        return statistics.median(xs) if xs else float("nan")

    head = f"{'candidate':<14} {'prefill s':>9} {'tok/s':>7} {'CPU s':>7} {'decode tok/s':>12} {'abort p50 ms':>12} {'abort max ms':>12} {'n':>3}"
    lines = [head, "-" * len(head)]
    for name in names:
        aborts = values(name, "abort_ms")
        lines.append(
            f"{name:<14} {p50(values(name, 'prefill_s')):>9.2f} {p50(values(name, 'prefill_tok_s')):>7.0f} "
            f"{p50(values(name, 'prefill_cpu_s')):>7.1f} {p50(values(name, 'decode_tok_s')):>12.1f} "
            f"{p50(aborts):>12.1f} {max(aborts, default=float('nan')):>12.1f} {len(aborts):>3}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--aborts", type=int, default=5, help="cancelled prefills per candidate and round")
    parser.add_argument("--only", default=",".join(CANDIDATES), help="comma-separated, from: %(default)s")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidates: {unknown}")
    model_path = str(resolve_model_path(ModelSettings(path=BENCH_MODEL)))
    records = measure(model_path, args.threads, names, args.rounds, args.aborts, args.seed)
    table = summary(records, names)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"throughput-{datetime.now():%Y%m%d-%H%M%S}.json"
    meta = {"threads": args.threads, "rounds": args.rounds, "seed": args.seed, "loadavg": os.getloadavg()}
    path.write_text(json.dumps({"meta": meta, "candidates": {n: CANDIDATES[n] for n in names},
                                "records": records, "table": table}, indent=1))
    print(f"Raw records: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

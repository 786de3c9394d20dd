"""The experiment behind the shipped `[pool]` layout: workers x threads x slots on this machine.

For each layout, Edison is started with config.toml's [model] settings and asked for c = 1, 2
and 4 greedy 128-token replies at once (`/chat/stream`, a nonce first so no prompt is reused);
it reports aggregate streamed tokens/s and the median time to first token, medians of rounds.
Layouts are interleaved by round, so a noisy minute hurts all of them alike.

    python -m benchmarks.layouts [--rounds 3] [--out benchmarks/results-layouts.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import BENCH_MODEL
from benchmarks.systems import Edison
from benchmarks.workload import counting
from edison.model import resolve_model_path
from edison.settings import DEFAULT_CONFIG, load_settings

LAYOUTS = [(1, 2, 4), (1, 2, 1), (2, 1, 1), (2, 1, 2), (1, 2, 8)]  # (workers, threads, slots)
CLIENTS = (1, 2, 4)


def burst(system: Edison, clients: int, rng: random.Random) -> dict[str, float]:
    """`clients` replies at once: aggregate tokens/s from the first send to the last token."""
    streams = [system.open(counting(rng), max_tokens=128) for _ in range(clients)]
    for stream in streams:
        stream.wait_for("done", 300)
    start = min(s.sent_at for s in streams)
    end = max(s.first("done").at for s in streams)  # type: ignore[union-attr]
    tokens = sum(s.count("token") for s in streams)
    ttft = [s.first("token").at - s.sent_at for s in streams]  # type: ignore[union-attr]
    for stream in streams:
        stream.close()
    return {"tok_s": tokens / (end - start), "ttft_s": statistics.median(ttft)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results-layouts.json")
    args = parser.parse_args()
    settings = load_settings(DEFAULT_CONFIG)
    model = replace(settings.model, path=str(resolve_model_path(replace(settings.model, path=BENCH_MODEL))))
    rng = random.Random(11)
    load_before = os.getloadavg()
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for workers, threads, slots in LAYOUTS:
                name = f"{workers}x{threads}x{slots}"
                system = Edison(model, threads, Path(tmp), workers=workers, slots=slots)
                system.launch()
                try:
                    system.wait_ready()
                    burst(system, 1, rng)  # warm-up
                    for c in CLIENTS:
                        row = burst(system, c, rng)
                        results.setdefault(name, {}).setdefault(c, []).append(row)
                        print(f"round {round_ + 1} {name} c={c}: {row['tok_s']:.1f} tok/s, ttft {row['ttft_s']:.2f} s",
                              flush=True)
                finally:
                    system.stop()
                time.sleep(1)
    summary: dict[str, Any] = {}
    for name, by_c in results.items():
        summary[name] = {
            str(c): {"tok_s": statistics.median(r["tok_s"] for r in rows),
                     "ttft_s": statistics.median(r["ttft_s"] for r in rows)}
            for c, rows in by_c.items()
        }
    print(f"\n{'layout (w x t x s)':<20}" + "".join(f"{f'c={c} tok/s':>14}{'ttft':>8}" for c in CLIENTS))
    for name, by_c in summary.items():
        print(f"{name:<20}" + "".join(f"{by_c[str(c)]['tok_s']:>14.1f}{by_c[str(c)]['ttft_s']:>8.2f}" for c in CLIENTS))
    record = {"when": datetime.now().isoformat(timespec="seconds"), "cpus": os.cpu_count(), "rounds": args.rounds,
              "load_before": load_before, "raw": results, "summary": summary}
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()

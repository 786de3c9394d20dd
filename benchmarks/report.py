"""From raw trial records to what a reader sees: summary rows (p50/p95/p99/max), the printed
table, the JSON file, the chart, and benchmarks/RESULTS.md.

A sample the benchmark gave up waiting for is "capped": its true value is at least the cap.
A percentile is marked "≥" when a capped sample sits at or below its rank (it is then only
a lower bound); otherwise it is exact.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HEADERS = ("section", "metric", "system", "n", "p50", "p95", "p99", "max")
MiB = 1024 * 1024


@dataclass(frozen=True)
class Row:
    section: str
    metric: str
    system: str
    samples: tuple[tuple[float, bool], ...] = ()  # (value, capped)
    unit: str = "s"  # s, tok/s
    text: str = ""  # a single value, already formatted (counts, memory, ratios)

    def cells(self) -> tuple[str, ...]:
        if self.text or not self.samples:
            return (self.section, self.metric, self.system, "1" if self.text else "0", self.text or "-", "", "", "")
        stats = [percentile(self.samples, p, self.unit) for p in (50, 95, 99, 100)]
        return (self.section, self.metric, self.system, str(len(self.samples)), *stats)

    def as_json(self) -> dict[str, Any]:
        return dict(zip(HEADERS, self.cells(), strict=True))


def percentile(samples: tuple[tuple[float, bool], ...], p: float, unit: str) -> str:
    """Nearest-rank percentile of lower-bounded samples."""
    ordered = sorted(samples, key=lambda s: s[0])
    k = max(0, math.ceil(p / 100 * len(ordered)) - 1)
    value = ordered[k][0]
    bound = any(capped for _, capped in ordered[: k + 1])
    return ("≥" if bound else "") + fmt(value, unit)


def fmt(value: float, unit: str) -> str:
    if unit == "tok/s":
        return f"{value:.1f} tok/s"
    if unit == "x":
        return f"{value:.2f}x"
    if value < 0.001:
        return f"{value * 1000:.2f} ms"
    if value < 1:
        return f"{value * 1000:.0f} ms" if value >= 0.1 else f"{value * 1000:.1f} ms"
    return f"{value:.2f} s" if value < 10 else f"{value:.1f} s"


def _samples(records: list[dict[str, Any]], key: str, capped_at: str | None = "cap_s") -> tuple[tuple[float, bool], ...]:
    out = []
    for r in records:
        value = r.get(key)
        if value is not None:
            out.append((float(value), False))
        elif capped_at and r.get("capped") and r.get(capped_at) is not None:
            out.append((float(r[capped_at]), True))
    return tuple(out)


def _by(records: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [r for r in records if "error" not in r and all(r.get(k) == v for k, v in match.items())]


def summarise(results: dict[str, Any]) -> list[Row]:
    trials = results["trials"]
    labels = results["head_to_head"]
    rows: list[Row] = []
    rows += _stop_rows(trials.get("stop", []), labels)
    rows += _recovery_rows(trials.get("recovery", []), labels)
    rows += _wedge_rows(trials.get("wedge", []))
    rows += _throughput_rows(trials.get("throughput", []), trials.get("prefill_speed", []))
    rows += _memory_rows(trials.get("memory", []))
    rows += _load_rows(trials.get("load", []), trials.get("lag", {}))
    from benchmarks import report_concurrency, report_conversations  # here: they import this module

    rows += report_concurrency.summarise(trials)
    rows += report_conversations.summarise(trials)
    return rows


def _stop_rows(records: list[dict[str, Any]], labels: list[str]) -> list[Row]:
    rows = []
    for phase, section in (("prefill", "prefill ~6k tok"), ("decode", "decode")):
        for how in ("cancel", "disconnect"):
            for label in labels:
                mine = _by(records, phase=phase, how=how, system=label)
                if not mine:
                    continue
                if how == "cancel":
                    rows.append(Row(section, "cancel → done", label, _samples(mine, "cancel_to_done_s")))
                rows.append(Row(section, f"{how} → CPU idle", label, _samples(mine, "cancel_to_idle_s")))
                if "worker_killed" in mine[0]:
                    killed = sum(bool(r.get("worker_killed")) for r in mine)
                    tiers = Counter(r.get("tier", "?") for r in mine)
                    tier_text = ", ".join(f"{t} {n}" for t, n in tiers.most_common())
                    rows.append(Row(section, f"{how}: worker killed", label, text=f"{killed} of {len(mine)}"))
                    rows.append(Row(section, f"{how}: stopped by tier", label, text=tier_text))
    return rows


def _recovery_rows(records: list[dict[str, Any]], labels: list[str]) -> list[Row]:
    rows = []
    for label in labels:
        mine = _by(records, system=label)
        if mine:
            rows.append(Row("recovery", "disconnect in prefill → next request's 1st token", label,
                            _samples(mine, "stop_to_next_token_s")))
    return rows


def _wedge_rows(records: list[dict[str, Any]]) -> list[Row]:
    rows = []
    for kind, name in (("sigstop", "wedged: SIGSTOP"), ("native", "wedged: in C call")):
        mine = _by(records, kind=kind)
        if not mine:
            continue
        label = mine[0]["system"]
        rows.append(Row(name, "cancel → done", label, _samples(mine, "cancel_to_done_s", None)))
        rows.append(Row(name, "kill → replacement ready", label, _samples(mine, "kill_to_ready_s", None)))
        rows.append(Row(name, "cancel → next request's 1st token", label, _samples(mine, "cancel_to_next_token_s", None)))
    return rows


def _throughput_rows(decodes: list[dict[str, Any]], prefills: list[dict[str, Any]]) -> list[Row]:
    """Per system: decode (time to first token, tokens/s) and prefill (time, tokens/s) rows, then
    Edison's speed against llama-server's and in-process llama-cpp-python's (ratio of p50s)."""
    rows: list[Row] = []
    speeds: dict[str, dict[str, float | None]] = {}
    for label in dict.fromkeys(r["system"] for r in [*decodes, *prefills] if "error" not in r):
        mine = _by(decodes, system=label)
        if mine:
            rows.append(Row("throughput", "time to first token", label, _samples(mine, "ttft_s", None)))
            tps = _samples(mine, "decode_tokens_per_s", None)
            rows.append(Row("throughput", "decode speed", label, tps, unit="tok/s"))
            speeds.setdefault(label, {})["decode"] = _median(tps)
        mine = _by(prefills, system=label)
        if mine:
            rows.append(Row("throughput", f"prefill time ({mine[0]['prompt_tokens']} tok)", label, _samples(mine, "prefill_s", None)))
            tps = _samples(mine, "prefill_tokens_per_s", None)
            rows.append(Row("throughput", "prefill speed", label, tps, unit="tok/s"))
            speeds.setdefault(label, {})["prefill"] = _median(tps)
    edison = next((k for k in speeds if k.startswith("edison")), None)
    for reference in ("llama-server", "in-process"):
        other = next((k for k in speeds if k.startswith(reference)), None)
        if not edison or not other:
            continue
        ratios = [f"{phase} {speeds[edison][phase] / speeds[other][phase]:.2f}x"  # type: ignore[operator]
                  for phase in ("prefill", "decode") if speeds[edison].get(phase) and speeds[other].get(phase)]
        if ratios:
            rows.append(Row("throughput", f"edison / {reference} speed (p50s)", edison, text=", ".join(ratios)))
    return rows


def _median(samples: tuple[tuple[float, bool], ...]) -> float | None:
    values = sorted(v for v, _ in samples)
    return values[len(values) // 2] if values else None


def _memory_rows(records: list[dict[str, Any]]) -> list[Row]:
    rows = []
    for label in dict.fromkeys(r["system"] for r in records):
        mine = [r for r in records if r["system"] == label]
        for r in mine:
            rows.append(Row("memory RSS/PSS/USS", r["role"], label, text=_mib(r)))
        if len(mine) > 1:
            total = {k: sum(r[k] for r in mine) for k in ("rss", "pss", "uss")}
            rows.append(Row("memory RSS/PSS/USS", "all processes", label, text=_mib(total)))
    return rows


def _mib(r: dict[str, Any]) -> str:
    return " / ".join(f"{r[k] / MiB:.0f}" for k in ("rss", "pss", "uss")) + " MiB"


def _load_rows(records: list[dict[str, Any]], lag: dict[str, list[float]]) -> list[Row]:
    mine = _by(records)
    if not mine:
        return []
    label, section = mine[0]["system"], f"load: {mine[0]['workers']} busy + {mine[0]['queue']} queued"
    rows = [
        Row(section, "cancel queued → done", label, _samples(mine, "queued_cancel_to_done_s", None)),
        Row(section, "cancel running → done", label, _samples(mine, "running_cancel_to_done_s", None)),
        Row(section, "queue full → 503", label, _samples(mine, "reject_s", None)),
    ]
    for state in ("idle", "loaded"):
        values = tuple((v, False) for v in lag.get(state, []))
        rows.append(Row(section, f"GET /health round trip, {state}", label, values))
    return rows


# Output.


def table(rows: list[Row]) -> str:
    cells = [HEADERS, *(r.cells() for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADERS))]
    lines, last = [], None
    for i, c in enumerate(cells):
        if i > 1 and c[0] != last:
            lines.append("")
        last = c[0]
        lines.append("  ".join(v.ljust(w) if j < 3 else v.rjust(w) for j, (v, w) in enumerate(zip(c, widths, strict=True))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * 3 + "---:|" * 5]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: Path, results: dict[str, Any], rows: list[Row]) -> None:
    path.write_text(json.dumps({**results, "summary": [r.as_json() for r in rows]}, indent=1, default=str))


CHART_PHASES = (
    ("prefill", "cancel", "prefill\ncancel"),
    ("prefill", "disconnect", "prefill\ndisconnect"),
    ("decode", "cancel", "decode\ncancel"),
    ("decode", "disconnect", "decode\ndisconnect"),
)
COLOURS = {"edison": "#1b7837", "seed": "#c51b7d", "llama-cpp-server": "#2166ac", "llama-server": "#e08214"}


def chart(path: Path, results: dict[str, Any], title: str) -> None:
    """Stop latency per phase per system, log scale: cancel -> CPU idle (decode, prefill) and
    cancel -> done (wedged workers, where only the kill tier can stop the work)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = results["trials"]
    labels = results["head_to_head"]
    groups: list[tuple[str, dict[str, tuple[tuple[float, bool], ...]]]] = []
    for phase, how, name in CHART_PHASES:
        groups.append((name, {lb: _samples(_by(trials.get("stop", []), phase=phase, how=how, system=lb), "cancel_to_idle_s") for lb in labels}))
    for kind, name in (("sigstop", "wedged\nSIGSTOP"), ("native", "wedged\nin C call")):
        mine = _by(trials.get("wedge", []), kind=kind)
        if mine:
            groups.append((name, {mine[0]["system"]: _samples(mine, "cancel_to_done_s", None)}))

    fig, ax = plt.subplots(figsize=(9, 4.6), dpi=100)
    width = 0.8 / max(1, len(labels))
    for g, (_, per_system) in enumerate(groups):
        for s, label in enumerate(labels):
            samples = per_system.get(label, ())
            if not samples:
                continue
            x = g - 0.4 + width * (s + 0.5)
            colour = COLOURS.get(label.split(" ")[0], "#555555")
            exact = [max(v, 3e-3) for v, capped in samples if not capped]
            lower = [max(v, 3e-3) for v, capped in samples if capped]
            jitter = [x + width * 0.3 * ((i * 7919) % 11 / 10 - 0.5) for i in range(len(samples))]
            ax.scatter(jitter[: len(exact)], exact, s=12, color=colour, alpha=0.6, linewidths=0)
            if lower:
                ax.scatter(jitter[len(exact) :], lower, s=40, marker="^", color=colour, alpha=0.9)
            if exact:
                ax.hlines(statistics.median(exact), x - width * 0.4, x + width * 0.4, color=colour, linewidth=2)
    for label in labels:
        ax.scatter([], [], color=COLOURS.get(label.split(" ")[0], "#555555"), label=label)
    ax.scatter([], [], marker="^", color="#777777", label="gave up waiting (≥)")
    ax.set_yscale("log")
    ax.set_ylim(3e-3, None)
    ax.axhline(1.0, color="#999999", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(groups)), [name for name, _ in groups])
    ax.set_ylabel("stop → computation stopped (s, log)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", which="major", alpha=0.3)
    fig.legend(fontsize=8, loc="lower center", ncol=len(labels) + 1, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


NOTES = "## Notes (by hand)"


def results_markdown(results: dict[str, Any], rows: list[Row], chart_name: str, previous: str = "") -> str:
    """RESULTS.md for this run; the "Soak" (benchmarks/soak.py --publish writes it) and "Notes (by
    hand)" sections of the `previous` file are kept."""
    from benchmarks import report_concurrency as rc  # here: they import this module
    from benchmarks import report_conversations

    meta = results["meta"]
    notes = previous[previous.index(NOTES) :] if NOTES in previous else f"{NOTES}\n\n(none yet)\n"
    soak = previous[previous.index(rc.SOAK) : previous.index(NOTES)] if rc.SOAK in previous and NOTES in previous else (
        f"{rc.SOAK}\n\n(none published yet: `python -m benchmarks.soak --cycles 1000 --publish`)\n\n")
    return f"""# Benchmark results

Latest full run of `python -m benchmarks` ({meta['finished']}, {meta['duration_s'] / 60:.1f} min,
commit `{meta['git_commit']}`), written by `python -m benchmarks --publish`.

**Machine:** {meta['cpu_model']}, {meta['cpu_count']} logical CPUs; load average {meta['loadavg_start']}
at the start and {meta['loadavg_end']} at the end (each trial's is in the JSON; the benchmark's own
{meta['threads']} busy threads count for {meta['threads']}: more than that means other work shared the
machine). The head-to-head systems were measured interleaved, trial by trial, so that anything
else on the machine hit them alike. Python {meta['python']}, llama-cpp-python {meta['llama_cpp_python']},
model `{meta['model']}` ({meta['prompt_tokens']} prompt tokens in the prefill trials), {meta['threads']}
threads for every system.

**Which model:** every table in this file, the sections written by hand included, was measured on
Gemma 3 270M (`gemma-3-270m-q4_k_m.gguf`). The benchmarks pin it (`benchmarks.BENCH_MODEL`) so
that numbers stay comparable across rounds, although the service's default model is now SmolLM2
135M Instruct.

## Headline: stopping during a ~6,000-token prefill

{headline(rows)}

![stop latency per phase per system]({chart_name})

## Throughput

{throughput_headline(rows)}

{rc.markdown(results, rows)}
{report_conversations.markdown(results, rows)}
## All results

{markdown_table(rows)}

{METHOD}
{soak}{notes}"""


def headline(rows: list[Row]) -> str:
    """The prefill stops and the recovery after one, with the longest fully measured sample beside
    the percentiles: for the baselines' stops that is the one trial that waited for their whole prefill."""
    picked = [r for r in rows if r.samples and (r.section == "recovery"
              or r.section.startswith("prefill") and "CPU idle" in r.metric)]
    lines = ["| stop | system | n | p50 | max | longest fully measured | trials capped |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in picked:
        cells = r.cells()
        exact = [v for v, capped in r.samples if not capped]
        longest = fmt(max(exact), r.unit) if exact else "-"
        capped = sum(c for _, c in r.samples)
        lines.append(f"| {r.metric} | {r.system} | {cells[3]} | {cells[4]} | {cells[7]} | {longest} | {capped} |")
    return "\n".join(lines)


def throughput_headline(rows: list[Row]) -> str:
    """Prefill and decode speed (p50) per system, and Edison's ratios."""
    speed = {(r.system, r.metric): r.cells()[4] for r in rows if r.section == "throughput" and r.samples}
    systems = list(dict.fromkeys(system for system, _ in speed))
    lines = ["| system | prefill time (p50) | prefill speed (p50) | decode speed (p50) |", "|---|---:|---:|---:|"]
    for system in systems:
        prefill_time = next((v for (s, m), v in speed.items() if s == system and m.startswith("prefill time")), "-")
        lines.append(f"| {system} | {prefill_time} | {speed.get((system, 'prefill speed'), '-')} "
                     f"| {speed.get((system, 'decode speed'), '-')} |")
    ratios = [f"- {r.metric}: **{r.text}**" for r in rows if r.section == "throughput" and r.text]
    return "\n".join(lines + [""] + ratios)


METHOD = """## What is measured, and how

- **Systems**, on the same machine, model, prompt text, greedy sampling and thread count:
  **edison** (1 worker x N threads for the head-to-head); **seed**, the seed's own design
  (`benchmarks/baselines/seed_server.py`: one process, `Llama(...)(stream=True)` on a thread,
  a flag checked between tokens); **llama-cpp-server**, llama-cpp-python's bundled server
  (`python -m llama_cpp.server ... --logits_all False`, since its default also computes the
  logits of every prompt token), which has no cancel: a client can only disconnect;
  **llama-server**, llama.cpp's own C++ server built from the llama.cpp that llama-cpp-python
  vendors (`benchmarks/llama_server.py`), with its own defaults and one slot, no cancel either.
  Edison and the in-process reference run Edison's [model] settings from config.toml.
- **cancel → done**: from just before the `POST /chat/cancel` is sent to the arrival of the
  stream's `done` event. **→ CPU idle**: from the same moment (or just before the socket is shut
  down, for a disconnect) until the computing process (Edison's worker; the baseline's only
  process) spends less than 15 ms of CPU in 150 ms, its CPU time sampled with psutil every
  5 ms (Linux counts CPU time in 10 ms ticks, so this is good to about 10 ms).
- **prefill**: a ~6,000-token prompt (with a random nonce first, so no prompt cache helps);
  the stop comes at a uniform random moment in the first seconds of the prefill. The baselines
  cannot stop there, so each such trial lasts until their prefill ends: one trial per baseline
  and way waits for the whole prefill, the others give up after a cap, count as "≥ cap", and
  restart the server. **worker killed** / **tier**: whether Edison's pool had to kill the worker
  (it should not) and which tier stopped it, from the service log.
- **decode**: the stop comes after a random 2-24 streamed tokens of a long counting reply.
- **recovery**: a client disconnects from a ~6,000-token prompt at a random moment of its prefill
  and at once sends a short counting request (16 tokens); the time from the disconnect to that
  request's first token. A server still computing the abandoned prompt makes it wait.
- **wedged**: Edison only. A worker SIGSTOPped mid-decode, or asleep in a C call deaf to the
  flag (`debug_wedge_s`); only the kill tier (1 s deadline) can end it. The next request is sent
  the moment `done` arrives. "kill → replacement ready" runs from the old worker's death (seen by
  the 5 ms probe) to /health (polled every 10 ms) showing the new worker ready.
- **throughput**: 128-token greedy replies; time to first token from the request's send, decode
  tokens/s after the first token; in-process is llama-cpp-python called directly in a process of
  its own (no HTTP, no pool), the same `Llama` settings as an Edison worker. **prefill**: a fresh
  ~6,000-token prompt (nonce first) with a one-token reply, timed from the send to the end of the
  reply; speed = prompt tokens / that time.
- **memory**: `psutil.memory_full_info()` after a warm-up of short replies. PSS splits shared
  pages (the mmapped model) between the processes that map them, so PSS adds up across processes.
- **load**: Edison with 2 workers x 1 thread, both decoding, and the queue full. The event-loop lag
  is measured from outside: the round trip of `GET /health` on a kept-alive connection every
  20 ms (it is answered on the event loop), with the service idle and loaded.
- **concurrency c=N** (`benchmarks/concurrency.py`): N clients send at once, each a greedy
  128-token counting reply through the system's streaming `/v1/completions` (the seed has none:
  its own stream). Aggregate speed = all replies' tokens (the server's usage count when it gives
  one) over first send → last token, one sample per round; first token = each client's send →
  its first token. Edison as shipped (config.toml's [pool], threads = cores / workers), Edison
  with 2 workers x 1 thread x 1 slot (the layout before batching), llama-server with 4 slots
  (`-c` 4 x 8192, continuous batching) and 1, llama-cpp-python's server (flash attention on,
  `interrupt_requests` off: on, a new request cuts the streaming one short). The systems take
  turns level by level; the order rotates every round.
- **stop 1 of the busy slots**: Edison as shipped, all slots but one decoding long counting
  replies; one more request (a ~4,000-token prompt, or a counting reply) takes the last slot and
  is cancelled or disconnected in its prefill (a random moment after the send) or its decode
  (after 2-24 tokens); rows go by the phase it was really in. → its slot free: until
  `/health?verbose=1` (polled every ~5 ms) shows no slot holding it; the worker frees it only by
  its `Cancelled`, sent once the sequence has left the batch. Others' gaps: between the other
  streams' token arrivals; "around it" = under way at the stop or starting within 0.5 s of it
  (or of the slot's release); the median is over the whole trial.
- **memory per slot**: one worker with S slots (each its 8,192-token KV cache), RSS/PSS/USS of
  the worker idle and with 1..S slots decoding; "slot S configured" compares S slots to S-1.
"""

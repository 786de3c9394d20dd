"""The concurrency section's and the soak's part of the report: rows for the table, and their
sections of RESULTS.md (a table per client count, the stop among busy slots, memory per slot,
each system's settings; the soak's before/after).

Kept apart from report.py, which calls it, so that each module stays small.
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.report import MiB, Row, _by, _samples, fmt

SOAK = "## Soak"


def summarise(trials: dict[str, Any]) -> list[Row]:
    return (_concurrency_rows(trials.get("concurrency", []), trials.get("concurrency_systems", []))
            + _slot_stop_rows(trials.get("slot_stop", []))
            + _slot_memory_rows(trials.get("slot_memory", [])))


def _concurrency_rows(records: list[dict[str, Any]], order: list[str]) -> list[Row]:
    rows: list[Row] = []
    good = _by(records)
    labels = order or list(dict.fromkeys(r["system"] for r in good))
    for c in sorted({r["clients"] for r in good}):
        section = f"concurrency c={c}"
        for label in labels:
            mine = _by(good, system=label, clients=c)
            if not mine:
                continue
            rows.append(Row(section, "aggregate speed", label, _samples(mine, "aggregate_tokens_per_s", None), "tok/s"))
            rows.append(Row(section, "first token", label, tuple((t, False) for r in mine for t in r["ttft_s"])))
            kills = sum(r.get("worker_kills") or 0 for r in mine)
            if kills:  # Edison's pool killed a worker during plain replies: a fault, and a slow trial
                rows.append(Row(section, "worker kills (a fault)", label, text=f"{kills:g}"))
        rows += _ratios(rows, section, c)
    return rows


def _ratios(rows: list[Row], section: str, c: int) -> list[Row]:
    """Edison as shipped (the first Edison listed) against llama-server with c's slot count."""
    speed = {r.system: _median(r.samples) for r in rows if r.section == section and r.metric == "aggregate speed"}
    first = {r.system: _median(r.samples) for r in rows if r.section == section and r.metric == "first token"}
    edison = next((s for s in speed if s.startswith("edison")), None)
    out = []
    for other in ("llama-server -np 4", "llama-server"):
        if edison and speed.get(other) and speed.get(edison):
            text = f"speed {speed[edison] / speed[other]:.2f}x"  # type: ignore[operator]
            if first.get(other) and first.get(edison):
                text += f", first token p50 {fmt(first[edison], 's')} vs {fmt(first[other], 's')}"  # type: ignore[arg-type]
            out.append(Row(section, f"edison / {other} (p50s)", edison, text=text))
    return out


def _median(samples: tuple[tuple[float, bool], ...]) -> float | None:
    return statistics.median(v for v, _ in samples) if samples else None


def _slot_stop_rows(records: list[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    for phase in ("prefill", "decode"):
        mine = _by(records, phase_at_stop=phase)
        if not mine:
            continue
        label, section = mine[0]["system"], f"stop 1 of the busy slots: {phase}"
        cancels, disconnects = _by(mine, how="cancel"), _by(mine, how="disconnect")
        rows.append(Row(section, "cancel → done", label, _samples(cancels, "cancel_to_done_s", None)))
        for how, group in (("cancel", cancels), ("disconnect", disconnects)):
            if group:
                rows.append(Row(section, f"{how} → its slot free", label, _samples(group, "stop_to_slot_free_s", None)))
        rows.append(Row(section, "others' longest gap around it", label,
                        _samples(mine, "others_longest_gap_around_stop_s", None)))
        rows.append(Row(section, "others' median gap", label, _samples(mine, "others_median_gap_s", None)))
        n = len(mine)
        rows.append(Row(section, "longest gap ≤ 2x median + 50 ms", label,
                        text=f"{sum(bool(r.get('gap_within_target')) for r in mine)} of {n}"))
        before = _median(_samples(mine, "others_median_gap_before_victim_s", None))
        after = _median(_samples(mine, "others_median_gap_after_free_s", None))
        if before and after:
            rows.append(Row(section, "others' median gap: before it came / after it left", label,
                            text=f"{fmt(before, 's')} / {fmt(after, 's')}"))
        kills = sum(r.get("worker_kills") or 0 for r in mine)
        same = sum(bool(r.get("same_worker")) for r in mine)
        kept = sum(bool(r.get("others_ok")) for r in mine)
        rows.append(Row(section, "worker kills; same worker; others kept streaming", label,
                        text=f"{kills:g}; {same} of {n}; {kept} of {n}"))
    return rows


def _slot_memory_rows(records: list[dict[str, Any]]) -> list[Row]:
    rows: list[Row] = []
    by_slots = {r["slots"]: r for r in records if r["busy"] == r["slots"]}
    for label in dict.fromkeys(r["system"] for r in records):
        mine = sorted((r for r in records if r["system"] == label), key=lambda r: r["busy"])
        slots = mine[0]["slots"]
        for r in mine:
            if r["busy"] in (0, 1, slots):
                rows.append(Row("memory per slot: worker RSS/PSS/USS", f"{r['busy']} busy", label, text=_mib(r)))
        if len(mine) >= 2 and mine[-1]["busy"] == slots:
            delta = {k: mine[-1][k] - mine[-2][k] for k in ("rss", "pss", "uss")}
            rows.append(Row("memory per slot: worker RSS/PSS/USS", f"busy chat {slots} of {slots}", label, text=_mib(delta, "+")))
        if slots - 1 in by_slots and slots in by_slots:
            delta = {k: by_slots[slots][k] - by_slots[slots - 1][k] for k in ("rss", "pss", "uss")}
            rows.append(Row("memory per slot: worker RSS/PSS/USS", f"slot {slots} configured ({slots} vs {slots - 1}, all busy)",
                            label, text=_mib(delta, "+")))
    return rows


def _mib(r: dict[str, Any], sign: str = "") -> str:
    return " / ".join(f"{r[k] / MiB:{sign}.0f}" for k in ("rss", "pss", "uss")) + " MiB"


# RESULTS.md.


def markdown(results: dict[str, Any], rows: list[Row]) -> str:
    """The "Concurrency" section: aggregate speed and first token per system and client count,
    then the stop among busy slots and memory rows, then every system's settings."""
    levels = sorted({int(r.section.split("=")[1]) for r in rows if r.section.startswith("concurrency c=")})
    if not levels:
        return ""
    cell = {(r.section, r.metric, r.system): r.cells() for r in rows if r.samples}
    systems = list(dict.fromkeys(r.system for r in rows if r.section.startswith("concurrency c=") and r.samples))
    head = "| system | " + " | ".join(f"c = {c}: tok/s, first token p50 / p95" for c in levels) + " |"
    lines = [head, "|---|" + "---:|" * len(levels)]
    for system in systems:
        cells = []
        for c in levels:
            speed, first = cell.get((f"concurrency c={c}", "aggregate speed", system)), cell.get((f"concurrency c={c}", "first token", system))
            cells.append(f"{speed[4] if speed else '-'}, {first[4]} / {first[5]}" if first else "-")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    notes = [f"- {r.section}, {r.metric}: **{r.text}**" for r in rows if r.section.startswith("concurrency") and r.text]
    others = [r for r in rows if r.section.startswith(("stop 1 of", "memory per slot"))]
    table = ["| section | metric | system | n | p50 | p95 | p99 | max |", "|---|---|---|---:|---:|---:|---:|---:|"]
    table += ["| " + " | ".join(r.cells()) + " |" for r in others]
    return "\n".join(["## Concurrency", "", *lines, "", *notes, "", *table, "", settings_markdown(results), ""])


def settings_markdown(results: dict[str, Any]) -> str:
    lines = ["**Each system's settings** (its command line; Edison's config file is in the JSON):", ""]
    seen = set()
    for system in results.get("systems", []):
        argv = " ".join(str(a) for a in system.get("argv", []))
        key = (system.get("label"), argv)
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"- {system.get('label')}{' (concurrency)' if system.get('section') else ''}: `{_short(argv)}`")
    return "\n".join(lines)


def _short(argv: str) -> str:
    """Paths shortened to their file names: the machine's layout is in the JSON."""
    return " ".join(word.rsplit("/", 1)[-1] if "/" in word else word for word in argv.split())


def soak_markdown(result: dict[str, Any]) -> str:
    meta, verdict = result["meta"], result["verdict"]
    lines = [SOAK, "", f"`python -m benchmarks.soak --cycles {meta['cycles']}` ({meta['finished']}, "
             f"{meta['duration_s'] / 60:.1f} min, commit `{meta['git_commit']}`, {meta['layout']}): "
             f"**{'pass' if verdict['ok'] else 'FAIL'}**" + ("" if verdict["ok"] else f" ({'; '.join(verdict['problems'])})"),
             "", "| process | fds before → after | threads before → after | RSS before → after |", "|---|---:|---:|---:|"]
    for role, before in result["before"]["processes"].items():
        after = result["after"]["processes"].get(role, {})
        lines.append(f"| {role} | {before['fds']} → {after.get('fds', '-')} | {before['threads']} → {after.get('threads', '-')} "
                     f"| {before['rss'] / MiB:.0f} → {after.get('rss', 0) / MiB:.0f} MiB |")
    counts = ", ".join(f"{k} {v}" for k, v in sorted(result["counts"].items()))
    lines += ["", f"Cycles by kind: {counts}. Faults injected: {result['faults']['sigkill']} SIGKILLs; "
              f"pool counters moved: {result['counters_delta']}; unasked: {result['unasked']}. "
              f"Bookkeeping after: {result['after']['health']}.", ""]
    return "\n".join(lines)


def replace_soak(previous: str, section: str, before: str) -> str:
    """`previous` RESULTS.md with its soak section replaced by `section` (added before `before` if none)."""
    if SOAK in previous:
        start = previous.index(SOAK)
        end = previous.find("\n## ", start + len(SOAK))
        return previous[:start] + section + ("\n" + previous[end + 1:] if end >= 0 else "")
    at = previous.find(before)
    return previous[:at] + section + "\n" + previous[at:] if at >= 0 else previous + "\n" + section

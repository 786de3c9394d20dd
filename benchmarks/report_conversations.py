"""The conversations section's part of the report: rows for the table (first token of first and
of returning turns, decode speed while returning chats share the slots, Edison's worker kill and
restart under a long chat) and its section of RESULTS.md.

Kept apart from report.py, which calls it, so that each module stays small.
"""

from __future__ import annotations

from typing import Any

from benchmarks.report import Row, _by, _samples

KILL = "conversations: worker SIGKILL under a long chat"
RESTART = "conversations: service restart under a long chat"


def summarise(trials: dict[str, Any]) -> list[Row]:
    return (_conversation_rows(trials.get("conversations", []), trials.get("conversations_systems", []))
            + _kill_rows(trials.get("conversation_kill", []))
            + _restart_rows(trials.get("conversation_restart", [])))


def _values(records: list[dict[str, Any]], key: str) -> tuple[tuple[float, bool], ...]:
    return tuple((v, False) for r in records for v in r[key] if v is not None)


def _conversation_rows(records: list[dict[str, Any]], order: list[str]) -> list[Row]:
    rows: list[Row] = []
    good = _by(records)
    labels = order or list(dict.fromkeys(r["system"] for r in good))
    for n in sorted({r["conversations"] for r in good}):
        section = f"conversations N={n}"
        for label in labels:
            mine = _by(good, system=label, conversations=n)
            if not mine:
                continue
            together = len(mine[0]["decode_requests"])
            rows.append(Row(section, "first turn: first token", label, _values(mine, "first_ttft_s")))
            rows.append(Row(section, "returning turn: first token", label, _values(mine, "returning_ttft_s")))
            rows.append(Row(section, f"{together} returning together: decode speed", label,
                            _samples(mine, "decode_tokens_per_s", None), "tok/s"))
            steady = _samples(mine, "steady_tokens_per_s", None)
            if steady:  # a server that runs one request at a time never has them all streaming
                rows.append(Row(section, f"{together} returning together: while all stream", label, steady, "tok/s"))
            cached = _cached(r for m in mine for r in m["requests"] if r["turn"] > 0)
            if cached:
                rows.append(Row(section, "returning turns: prompt tokens cached (usage)", label, text=cached))
            empty = [q for r in mine for q in r["requests"] + r["decode_requests"] if q.get("ended_at_once")]
            if empty:  # their first token is the one that ended them, timed by the finish chunk
                rows.append(Row(section, "replies that ended at once (no text)", label,
                                text=f"{len(empty)} of {sum(len(r['requests'] + r['decode_requests']) for r in mine)}"))
            kills = sum(r.get("worker_kills") or 0 for r in mine)
            if kills:  # Edison's pool killed a worker during plain chats: a fault, and a slow run
                rows.append(Row(section, "worker kills (a fault)", label, text=f"{kills:g}"))
    return rows


def _cached(requests: Any) -> str:
    """"x of y" prompt tokens, over the requests whose usage says how many were cached."""
    counted = [(_cached_tokens(r["usage"]), r["usage"]["prompt_tokens"]) for r in requests if r.get("usage")]
    counted = [(c, p) for c, p in counted if c is not None and p]
    if not counted:
        return ""
    cached, total = sum(c for c, _ in counted), sum(p for _, p in counted)
    return f"{cached} of {total} ({100 * cached / total:.0f} %)"


def _cached_tokens(usage: dict[str, Any]) -> int | None:
    """OpenAI puts it in `prompt_tokens_details` (llama-server does); a plain `cached_tokens` counts too."""
    details = usage.get("prompt_tokens_details") or {}
    value = details.get("cached_tokens", usage.get("cached_tokens"))
    return int(value) if value is not None else None


def _usage_text(records: list[dict[str, Any]]) -> str:
    parts = []
    for r in records:
        usage = r.get("usage") or {}
        cached = _cached_tokens(usage)
        parts.append(f"{usage.get('prompt_tokens')} prompt / {usage.get('completion_tokens')} completion"
                     + (f" / {cached} cached" if cached is not None else ""))
    return "; ".join(parts)


def _prompt(records: list[dict[str, Any]]) -> str:
    """The prompt length the server counted (the first record's), for the rows' names."""
    return str((records[0].get("usage") or {}).get("prompt_tokens", "?"))


def _kill_rows(records: list[dict[str, Any]]) -> list[Row]:
    mine = _by(records)
    if not mine:
        return []
    label = mine[0]["system"]
    resumed = sum(int(r.get("resumed") or 0) for r in mine)
    return [
        Row(KILL, f"first token before the kill ({_prompt(mine)} tok, cold)", label, _samples(mine, "ttft_s", None)),
        Row(KILL, "kill → replacement ready", label, _samples(mine, "kill_to_ready_s", None)),
        Row(KILL, "kill → next token, same stream", label, _samples(mine, "kill_to_next_token_s", None)),
        Row(KILL, "resumed; final usage", label, text=f"{resumed} of {len(mine)}; {_usage_text(mine)}"),
    ]


def _restart_rows(records: list[dict[str, Any]]) -> list[Row]:
    mine = _by(records)
    if not mine:
        return []
    label = mine[0]["system"]
    return [
        Row(RESTART, f"turn 1 ({_prompt([r['requests'][0] for r in mine])} tok, cold): first token", label,
            _samples(mine, "cold_ttft_s", None)),
        Row(RESTART, "turn 2, same service: first token", label, _samples(mine, "warm_ttft_s", None)),
        Row(RESTART, "restart (SIGTERM → ready)", label, _samples(mine, "restart_s", None)),
        Row(RESTART, "turn 3 after the restart: first token", label, _samples(mine, "after_restart_ttft_s", None)),
        Row(RESTART, "turn 3: usage", label, text=_usage_text([r["requests"][-1] for r in mine])),
    ]


# RESULTS.md.


def markdown(results: dict[str, Any], rows: list[Row]) -> str:
    """The "Conversations" section: per system and N, first token of first and returning turns
    and the decode speed; then Edison's kill and restart rows, and how it was measured."""
    counts = sorted({int(r.section.split("=")[1]) for r in rows if r.section.startswith("conversations N=")})
    if not counts:
        return ""
    cell = {(r.section, r.metric, r.system): r.cells() for r in rows if r.samples}
    systems = list(dict.fromkeys(r.system for r in rows if r.section.startswith("conversations N=") and r.samples))
    head = "| system | " + " | ".join(f"N = {n}: first turn p50 / p95, returning p50 / p95, decode" for n in counts) + " |"
    lines = [head, "|---|" + "---:|" * len(counts)]
    for system in systems:
        cells = []
        for n in counts:
            section = f"conversations N={n}"
            first = cell.get((section, "first turn: first token", system))
            back = cell.get((section, "returning turn: first token", system))
            speed = next((c for (s, m, y), c in cell.items() if (s, y) == (section, system) and m.endswith("decode speed")), None)
            cells.append(f"{first[4]} / {first[5]}, {back[4]} / {back[5]}, {speed[4] if speed else '-'}"
                         if first and back else "-")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    notes = [f"- {r.section}, {r.metric}: **{r.text}**" for r in rows if r.section.startswith("conversations N=") and r.text]
    faults = [r for r in rows if r.section in (KILL, RESTART)]
    table = ["| section | metric | system | n | p50 | p95 | p99 | max |", "|---|---|---|---:|---:|---:|---:|---:|"]
    table += ["| " + " | ".join(r.cells()) + " |" for r in faults]
    plan = results.get("plan", {})
    parts = ["## Conversations", "", *lines, "", *([*notes, ""] if notes else []), *table, "", method(plan), ""]
    return "\n".join(parts)


def method(plan: dict[str, Any]) -> str:
    opening, reply = plan.get("conversation_opening_tokens"), plan.get("conversation_reply_tokens")
    return f"""N chats of {plan.get('conversation_turns')} turns through each system's streaming
`/v1/chat/completions` (greedy, repeat penalty 1.0, {reply}-token replies): a distinct
~{opening}-token first message per chat, then the whole history (replies as received) and a
short new message per turn; turns interleaved across chats, at most
{plan.get('conversation_in_flight')} in flight, so a returning turn's first token includes
its wait for a free slot. Decode: the last chats send one more turn together
({plan.get('conversation_decode_tokens')}-token replies); all their streamed tokens over first
token → last token (a later chat's prefill inside it counts), and the steady speed while all of
them streamed. Each server renders the messages its own way (Edison a "User:/Assistant:"
transcript, since the model has no chat template; llama-server its ChatML fallback;
llama-cpp-python its llama-2 fallback), so prompt lengths and replies differ. A reply that ended
at once (no text: the base model under llama-2 markup does that on returning turns) is timed by
its finish chunk, since the token that ended it was its first. llama-server keeps its RAM prompt
cache (`--cache-ram`, on by default); llama-cpp-python's `--cache` is off, its default. Kill: a ~{plan.get('conversation_long_tokens')}-token
chat's worker SIGKILLed 4 tokens into its reply; Edison resumes it on a replacement worker
(tokens arriving within 100 ms of the kill were already on their way and do not count as the
next one). Restart: the service stopped by SIGTERM and started again between turns 2 and 3."""


"""Constrained decoding speed: greedy decode tokens/s with and without a JSON schema, for Edison
(/chat/stream with "format") and llama.cpp's llama-server (/completion with `json_schema`),
given the same prompt text, the same schema and the same sampling.

A grammar can cost a lot: run over the whole vocabulary (262,144 tokens on the bundled model)
on every token, it made decoding ~4x slower here (DESIGN.md). Both servers draw a token first
and run the grammar over the vocabulary only when it rejects that token; this measures what is
left. Systems and kinds are interleaved round by round, so the machine's load hits all alike.

    python -m benchmarks.constrained                  # 3 rounds, 128 tokens, both systems
    python -m benchmarks.constrained --rounds 1 --only edison
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import BENCH_MODEL
from benchmarks.client import SSEStream
from benchmarks.run import edison_model
from benchmarks.systems import Edison, LlamaServer, System
from benchmarks.workload import counting, nonce
from edison.model import resolve_model_path
from edison.settings import ModelSettings

HERE = Path(__file__).resolve().parent
TOKENS = 128  # one of workload.REPLY_LENGTHS: Edison's benchmark modes are named by length

# A realistic shape: objects, bounded strings, an enum, an integer, in an array long enough
# that greedy decoding fills the whole token budget (without minItems the model writes "[]").
TEAM = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "role": {"enum": ["engineer", "designer", "manager"]},
        },
        "required": ["name", "age", "role"],
        "additionalProperties": False,
    },
    "minItems": 20,
    "maxItems": 50,
}


def team(rng: random.Random) -> str:
    return f"{nonce(rng)} List the members of a small team as JSON, with their name, age and role."


def open_stream(system: System, message: str, schema: dict[str, Any] | None) -> SSEStream:
    if schema is None:
        return system.open(message, max_tokens=TOKENS)
    key = "format" if isinstance(system, Edison) else "json_schema"
    return system.open(message, max_tokens=TOKENS, **{key: schema})


def decode_run(system: System, rng: random.Random, constrained: bool) -> dict[str, Any]:
    """One greedy reply: decode tokens/s between its first and last token, as the client sees it."""
    message, schema = (team(rng), TEAM) if constrained else (counting(rng), None)
    stream = open_stream(system, message, schema)
    try:
        done = stream.wait_for("done", 300)
    finally:
        stream.close()
    stamps = [e.at for e in stream.events if e.name == "token"]
    text = "".join(e.data.get("t", "") for e in stream.events if e.name == "token")
    count = (done.data.get("usage") or {}).get("completion_tokens") or len(stamps)
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    record = {"system": system.label, "kind": "schema" if constrained else "plain", "tokens": count,
              "decode_tokens_per_s": (count - 1) / span if span > 0 else None, "ok": done.data.get("ok")}
    if constrained:
        record["valid_prefix"] = text.lstrip().startswith("[")
        try:
            json.loads(text)
            record["parses"] = True
        except ValueError:
            record["parses"] = False  # cut by the token budget: expected for a long array
    return record


def measure(systems: list[System], rounds: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records: list[dict[str, Any]] = []
    for system in systems:
        decode_run(system, rng, constrained=True)  # warm-up: the first request pays for page faults
    for round_ in range(rounds):
        for system in systems:
            for constrained in (False, True):
                print(f"round {round_ + 1}/{rounds}: {system.label} {'schema' if constrained else 'plain'}", flush=True)
                records.append({"round": round_, **decode_run(system, rng, constrained)})
    return records


def summary(records: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    def p50(system: str, kind: str) -> float | None:
        xs = [r["decode_tokens_per_s"] for r in records if r["system"] == system and r["kind"] == kind
              and r["decode_tokens_per_s"] is not None]
        return statistics.median(xs) if xs else None

    systems = list(dict.fromkeys(r["system"] for r in records))
    rows, table = {}, [f"{'system':<28} {'plain tok/s':>11} {'schema tok/s':>12} {'schema/plain':>12}"]
    table.append("-" * len(table[0]))
    for system in systems:
        plain, schema = p50(system, "plain"), p50(system, "schema")
        ratio = schema / plain if plain and schema else None
        rows[system] = {"plain_tok_s": plain, "schema_tok_s": schema, "schema_over_plain": ratio}
        table.append(f"{system:<28} {_num(plain):>11} {_num(schema):>12} {_num(ratio, 2):>12}")
    edison = next((rows[s] for s in systems if s.startswith("edison")), None)
    server = rows.get(LlamaServer.name)
    if edison and server and edison["schema_tok_s"] and server["schema_tok_s"]:
        ratio = edison["schema_tok_s"] / server["schema_tok_s"]
        rows["edison_over_llama_server_schema"] = ratio
        table.append(f"Edison constrained / llama-server constrained: {ratio:.2f}x (target >= 0.9x)")
    return "\n".join(table), rows


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.constrained", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", default="edison,llama-server", help="comma-separated: edison, llama-server")
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    model = edison_model(str(resolve_model_path(ModelSettings(path=BENCH_MODEL))), args.threads, {})
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    workdir = args.out / f"logs-constrained-{stamp}"
    workdir.mkdir(parents=True)
    names = [n for n in args.only.split(",") if n]
    makers = {"edison": lambda: Edison(model, args.threads, workdir, workers=1, slots=1),
              "llama-server": lambda: LlamaServer(model, args.threads, workdir)}
    systems = [makers[n]() for n in names]
    try:
        for system in systems:
            system.launch()
            system.wait_ready()
        records = measure(systems, args.rounds, args.seed)
    finally:
        for system in systems:
            system.stop()
    table, rows = summary(records)
    print(table)
    path = args.out / f"constrained-{stamp}.json"
    meta = {"threads": args.threads, "rounds": args.rounds, "seed": args.seed, "tokens": TOKENS,
            "loadavg_after": os.getloadavg(), "schema": TEAM}
    path.write_text(json.dumps({"meta": meta, "summary": rows, "records": records, "table": table}, indent=1))
    print(f"Raw records: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

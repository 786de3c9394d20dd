"""What the saved KV states cost in memory (issue #22): Edison as shipped, 16 conversations with
~2k-token openings (4 at a time, as many as the shipped worker has slots), each coming back once
after the other 15 have taken its slot; then the RSS/PSS/USS of every process, the RAM tier's
bytes in tmpfs and on disk against its budget, and where each returning turn's prefix came from.

    python -m benchmarks.kv_memory [--conversations 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import BENCH_MODEL
from benchmarks.concurrency import reply
from benchmarks.run import edison_model, machine_info
from benchmarks.systems import Edison, kv_ram_dir, memory
from benchmarks.workload import conversation_opening, follow_up
from edison.model import resolve_model_path
from edison.settings import DEFAULT_CONFIG, ModelSettings, load_settings

HERE = Path(__file__).resolve().parent


def turns(edison: Edison, chats: list[list[dict[str, str]]], reply_tokens: int) -> list[dict[str, Any]]:
    """One turn of every chat, `slots` at a time; the replies join their chats' histories."""
    slots, done = edison.slots, []
    for start in range(0, len(chats), slots):
        group = chats[start:start + slots]
        streams = [edison.open_chat(chat, reply_tokens) for chat in group]
        for chat, stream in zip(group, streams):
            stream.closed.wait(600)
            record = reply(stream)
            text = "".join(e.data.get("t", "") for e in stream.events if e.name == "token")
            chat.append({"role": "assistant", "content": text})
            done.append(record)
    return done


def tmpfs_bytes(path: Path) -> int:
    """Bytes the directory takes in its file system (du), 0 if it is not there."""
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=False).stdout
    return int(out.split()[0]) if out else 0


def measure(conversations: int, opening_tokens: int, workdir: Path, seed: int) -> dict[str, Any]:
    shipped = load_settings(DEFAULT_CONFIG)
    threads = os.cpu_count() or 2
    model = edison_model(str(resolve_model_path(ModelSettings(path=BENCH_MODEL))), threads, {})
    edison = Edison(model, max(1, threads // shipped.pool.workers), workdir, workers=shipped.pool.workers,
                    slots=shipped.pool.slots)
    rng = random.Random(seed)
    chats = [[{"role": "user", "content": conversation_opening(rng, opening_tokens)}] for _ in range(conversations)]
    edison.launch()
    try:
        edison.wait_ready()
        before = {role: memory(pid) for role, pid in edison.processes().items()}
        started = time.monotonic()
        first = turns(edison, chats, 16)
        for chat in chats:
            chat.append({"role": "user", "content": follow_up(1)})
        returning = turns(edison, chats, 16)
        after = {role: memory(pid) for role, pid in edison.processes().items()}
        health = edison.health(verbose=True)
        ram_dir = kv_ram_dir(workdir)
        return {
            "conversations": conversations, "opening_tokens": opening_tokens, "slots": edison.slots,
            "duration_s": round(time.monotonic() - started, 1),
            "memory_before": before, "memory_after": after,
            "kv_cache": health["kv_cache"], "ram_dir_du_bytes": tmpfs_bytes(ram_dir),
            "disk_dir_du_bytes": tmpfs_bytes(workdir / "kv-disk"),
            "ram_budget_bytes": shipped.kv_cache.ram_mib << 20, "disk_budget_bytes": shipped.kv_cache.disk_mib << 20,
            "first": first, "returning": returning,
        }
    finally:
        edison.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--opening-tokens", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=22)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edison-kv-memory-") as tmp:
        result = measure(args.conversations, args.opening_tokens, Path(tmp), args.seed)
    threads = os.cpu_count() or 2
    result["meta"] = machine_info(edison_model(str(resolve_model_path(ModelSettings(path=BENCH_MODEL))), threads, {}),
                                  threads, {})
    result["meta"]["finished"] = datetime.now().strftime("%Y-%m-%d %H:%M")
    path = args.out / f"kv-memory-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    mib = 2**20
    print(f"{result['conversations']} conversations, {result['opening_tokens']}-token openings, {result['duration_s']} s")
    for role, m in result["memory_after"].items():
        b = result["memory_before"][role]
        print(f"  {role:<10} RSS {b['rss'] / mib:7.0f} -> {m['rss'] / mib:7.0f} MiB   PSS {b['pss'] / mib:7.0f} -> "
              f"{m['pss'] / mib:7.0f} MiB   USS {b['uss'] / mib:7.0f} -> {m['uss'] / mib:7.0f} MiB")
    for tier, use in result["kv_cache"].items():
        print(f"  {tier} tier: {use['entries']} entries, {use['bytes'] / mib:.0f} MiB of {use['budget_bytes'] / mib:.0f} MiB")
    print(f"  tmpfs (du): {result['ram_dir_du_bytes'] / mib:.0f} MiB; disk (du): {result['disk_dir_du_bytes'] / mib:.0f} MiB")
    sources: dict[str, int] = {}
    for r in result["returning"]:
        details = (r["usage"] or {}).get("prompt_tokens_details") or {}
        key = "cached" if details.get("cached_tokens") else "read"
        sources[key] = sources.get(key, 0) + 1
    print(f"  returning turns: {sources}")
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

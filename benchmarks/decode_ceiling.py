"""The ceiling under the four-chat decode target (issue #22): llama.cpp's own time for one step
of four one-token rows, called in-process with nothing around it (no service, no HTTP, no
sampler: argmax), in Edison's worker context (`context_params`: per-sequence KV, the shipped
`n_ubatch`), after a short prompt and after a ~2.4k-token one, with Gemma's sliding-window
layers kept at their window (`swa_full = false`, shipped) and at full size.

No server over HTTP can stream four chats faster than 4000 / (this step's ms) tokens a second on
the same threads; the conversations section's "while all stream" figures are measured against it.

    python -m benchmarks.decode_ceiling [--steps 150] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks import BENCH_MODEL
from benchmarks.run import edison_model, machine_info
from benchmarks.workload import COUNTING, conversation_opening
from edison.model import resolve_model_path
from edison.settings import ModelSettings

HERE = Path(__file__).resolve().parent
ROWS = 4
WARM_UP = 20


def step_times(model_path: str, settings: ModelSettings, threads: int, opening_tokens: int, steps: int) -> list[float]:
    """Milliseconds of each `llama_decode` of ROWS one-token rows, after ROWS prompts of about
    `opening_tokens` tokens (distinct, so no sequence shares another's prefix)."""
    import llama_cpp
    import numpy as np
    from llama_cpp import _internals as internals

    from edison.worker.engine import context_params

    model = internals.LlamaModel(path_model=model_path, params=llama_cpp.llama_model_default_params(), verbose=False)
    ctx = internals.LlamaContext(model=model, params=context_params(settings, threads, ROWS), verbose=False)
    batch = llama_cpp.llama_batch_init(settings.n_batch + ROWS, 0, 1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(model.vocab)

    def decode(rows: list[tuple[int, list[int], int]]) -> None:
        n = 0
        for seq, tokens, start in rows:
            for i, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, start + i, 1
                batch.seq_id[n][0], batch.logits[n] = seq, i == len(tokens) - 1
                n += 1
        batch.n_tokens = n
        if llama_cpp.llama_decode(ctx.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    rng = random.Random(22)
    heads: list[list[int]] = []  # [position, last token] of each sequence
    for seq in range(ROWS):
        text = conversation_opening(rng, opening_tokens) if opening_tokens > 64 else f"Chat {seq}: {COUNTING}"
        tokens = model.tokenize(text.encode(), add_bos=True, special=False)
        for start in range(0, len(tokens), settings.n_batch):
            decode([(seq, tokens[start:start + settings.n_batch], start)])
        heads.append([len(tokens), tokens[-1]])
    times = []
    for _ in range(WARM_UP + steps):
        began = time.perf_counter()
        decode([(seq, [last], pos) for seq, (pos, last) in enumerate(heads)])
        times.append((time.perf_counter() - began) * 1000)
        for row, head in enumerate(heads):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx.ctx, row), shape=(n_vocab,))
            head[0], head[1] = head[0] + 1, int(logits.argmax())
    llama_cpp.llama_batch_free(batch)
    return times[WARM_UP:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_ceiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    threads = os.cpu_count() or 2
    model_path = str(resolve_model_path(ModelSettings(path=BENCH_MODEL)))
    shipped = edison_model(model_path, threads, {})
    runs: list[dict[str, Any]] = []
    for opening in (16, 2300):
        for swa_full in (False, True):
            times = step_times(model_path, dataclasses.replace(shipped, swa_full=swa_full), threads, opening, args.steps)
            p50 = statistics.median(times)
            runs.append({"opening_tokens": opening, "swa_full": swa_full, "step_ms": times, "step_ms_p50": p50,
                         "tokens_per_s": ROWS * 1000 / p50})
            print(f"opening ~{opening:>4} tokens, swa_full={swa_full!s:<5}: step p50 {p50:5.1f} ms "
                  f"(mean {statistics.mean(times):5.1f}) -> {ROWS * 1000 / p50:5.1f} tok/s for {ROWS} chats")
    result = {"rows": ROWS, "threads": threads, "runs": runs, "meta": machine_info(shipped, threads, {})}
    result["meta"]["finished"] = datetime.now().strftime("%Y-%m-%d %H:%M")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"decode-ceiling-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""llama-cpp-python called in-process: no HTTP, no pool, no pipe. The throughput reference.

Loads the model once, with the `Llama` arguments an Edison worker would use for the given
[model] settings (`edison.worker.engine.llama_options`), prints `ready`, then answers one JSON line
per JSON line on stdin: `{"prompt": str, "max_tokens": int, "options": {...}}` ->
`{"token_at": [...], "elapsed": s, "text": str}` (seconds from the call), or
`{"tokenize": str}` -> `{"tokens": n}`.

    python -m benchmarks.baselines.inprocess --model PATH --threads 2 --settings '{"n_ubatch": 256}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import llama_cpp

from edison.worker.engine import llama_options
from edison.settings import ModelSettings


def run(llm: llama_cpp.Llama, request: dict) -> dict:
    if "tokenize" in request:
        return {"tokens": len(llm.tokenize(request["tokenize"].encode("utf-8"), add_bos=True))}
    start = time.monotonic()
    token_at, parts = [], []
    for chunk in llm(request["prompt"], stream=True, max_tokens=request["max_tokens"], **request.get("options", {})):
        token_at.append(time.monotonic() - start)
        parts.append(chunk["choices"][0]["text"])
    return {"token_at": token_at, "elapsed": time.monotonic() - start, "text": "".join(parts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--settings", default="{}", help="[model] settings as JSON (Edison's defaults otherwise)")
    args = parser.parse_args()
    model = ModelSettings(**json.loads(args.settings))
    llm = llama_cpp.Llama(args.model, **llama_options(model, args.threads))
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run(llm, json.loads(line))), flush=True)


if __name__ == "__main__":
    main()

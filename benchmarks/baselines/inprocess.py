"""llama-cpp-python called in-process: no HTTP, no pool, no pipe. The throughput reference.

Loads the model once, prints `ready`, then answers one JSON line per JSON line on stdin:
`{"prompt": str, "max_tokens": int, "options": {...}}` -> `{"sent_at": 0.0, "token_at": [...]}`
(seconds from the call), or `{"tokenize": str}` -> `{"tokens": n}`.

    python -m benchmarks.baselines.inprocess --model PATH --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import llama_cpp


def run(llm: llama_cpp.Llama, request: dict) -> dict:
    if "tokenize" in request:
        return {"tokens": len(llm.tokenize(request["tokenize"].encode("utf-8"), add_bos=True))}
    start = time.monotonic()
    token_at, parts = [], []
    for chunk in llm(request["prompt"], stream=True, max_tokens=request["max_tokens"], **request.get("options", {})):
        token_at.append(time.monotonic() - start)
        parts.append(chunk["choices"][0]["text"])
    return {"token_at": token_at, "text": "".join(parts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=8192)
    args = parser.parse_args()
    llm = llama_cpp.Llama(args.model, n_ctx=args.n_ctx, n_batch=512, n_ubatch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(run(llm, json.loads(line))), flush=True)


if __name__ == "__main__":
    main()

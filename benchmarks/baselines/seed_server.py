"""The seed's design, re-implemented faithfully as a baseline: one process, one in-process
`Llama`, `llm(prompt, stream=True)` on a thread, and a per-request flag checked between tokens.

A cancel (or a disconnect, through the stream's `finally`) sets the flag; the generation
thread sees it at the next token. Nothing can see it during the prefill, which runs inside
one call into llama.cpp: that is what the benchmark measures.

    python -m benchmarks.baselines.seed_server --model PATH --threads 2 --flash-attn --port 8000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import uuid

import llama_cpp
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

LLM: llama_cpp.Llama
LOCK = threading.Lock()  # one Llama, one generation at a time
FLAGS: dict[str, threading.Event] = {}


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def generate(prompt: str, options: dict, flag: threading.Event, emit) -> None:
    parts: list[str] = []
    try:
        with LOCK:
            for chunk in LLM(prompt, stream=True, **options):
                if flag.is_set():  # the only cancel check: between tokens
                    return emit("done", {"ok": False, "stopped": True, "response": "".join(parts)})
                parts.append(chunk["choices"][0]["text"])
                emit("token", {"t": parts[-1]})
        emit("done", {"ok": True, "response": "".join(parts)})
    except Exception as exc:  # noqa: BLE001
        emit("done", {"ok": False, "error": str(exc)})


async def chat_stream(request):
    body = await request.json()
    request_id, flag = str(uuid.uuid4()), threading.Event()
    FLAGS[request_id] = flag
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    emit = lambda event, data: loop.call_soon_threadsafe(queue.put_nowait, (event, data))  # noqa: E731
    loop.run_in_executor(None, generate, body["prompt"], body.get("options", {}), flag, emit)

    async def events():
        try:
            yield sse("init", {"request_id": request_id})
            while True:
                event, data = await queue.get()
                yield sse(event, data)
                if event == "done":
                    return
        finally:  # a disconnect is a cancel
            flag.set()
            FLAGS.pop(request_id, None)

    return StreamingResponse(events(), media_type="text/event-stream")


async def chat_cancel(request):
    request_id = (await request.json())["request_id"]
    flag = FLAGS.get(request_id)
    if flag:
        flag.set()
    return JSONResponse({"status": "cancelled" if flag else "not_found", "request_id": request_id})


def main() -> None:
    global LLM
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=8192)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--flash-attn", action="store_true", help="the seed's Llama takes it: the benchmark turns it on")
    args = parser.parse_args()
    LLM = llama_cpp.Llama(args.model, n_ctx=args.n_ctx, n_batch=512, n_ubatch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, flash_attn=args.flash_attn, verbose=False)
    routes = [Route("/chat/stream", chat_stream, methods=["POST"]), Route("/chat/cancel", chat_cancel, methods=["POST"])]
    uvicorn.run(Starlette(routes=routes), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

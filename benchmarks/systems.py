"""The systems under test, one small class each, behind one interface.

A `System` is an HTTP server in its own process(es), started by the benchmark on a free
loopback port. It can `open` a streaming request (an `SSEStream`, normalised to
init/token/progress/queued/done events), maybe `cancel` it, name the process that does the
computing for it (`compute_pid`), and list its processes for the memory table. Every system
also answers `open_completion`: the same greedy reply through its OpenAI-style streaming
`/v1/completions`, which the concurrency section sends to all of them alike, and `open_chat`:
a conversation's messages through `/v1/chat/completions` (the conversations section), which
each server renders with its own chat format. Adding another system is one more subclass here
and one more entry in `SYSTEMS`.

Every system gets the same model file and thread count. Edison (and the in-process reference)
run Edison's [model] settings from config.toml, with the run's `--set` overrides; the others
run their own defaults, as their users would, plus what their API offers to be at their best
(flash attention for llama-cpp-python's server and the seed; llama-server turns it on itself).

Every process is started through a small shim that sets PR_SET_PDEATHSIG, so even a
benchmark that is SIGKILLed leaves no server behind; `stop()` ends what it started by pid.
"""

from __future__ import annotations

import atexit
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, ClassVar

import psutil

from benchmarks import llama_server
from benchmarks.client import Event, SSEStream, end_process, free_port, kill_pid, wait_until
from benchmarks.workload import LONG_REPLY, REPLY_LENGTHS, SAMPLING, STOPS, transcript
from edison.settings import ModelSettings

REPO = Path(__file__).resolve().parent.parent

# Runs argv[2:] with PR_SET_PDEATHSIG = SIGKILL, unless the parent (argv[1]) is already gone.
# A shim instead of Popen(preexec_fn=...), which is unsafe in a process that has threads.
_DIE_WITH_PARENT = (
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9, 0, 0, 0); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execv(sys.argv[2], sys.argv[2:])"
)


def http_json(port: int, method: str, path: str, body: Any = None, timeout: float = 10.0) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, body=payload, headers={"Content-Type": "application/json"} if payload else {})
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")
    finally:
        conn.close()


def metric(port: int, name: str) -> float:
    """One unlabelled series of Edison's /metrics (0 if absent)."""
    _, text = http_json(port, "GET", "/metrics")
    for line in str(text).splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def memory(pid: int) -> dict[str, int]:
    info = psutil.Process(pid).memory_full_info()
    return {"rss": info.rss, "pss": info.pss, "uss": info.uss}


class Process:
    """One child process with its log file, started with the parent-death shim."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Call from the main thread: the death signal follows the thread that forks."""
        log = open(self.log_path, "ab")
        shim = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *self.argv]
        env = {k: v for k, v in (self.env or os.environ).items() if k != "NOTIFY_SOCKET"}
        self.popen = subprocess.Popen(shim, cwd=REPO, stdout=kwargs.pop("stdout", log), stderr=log, env=env, **kwargs)
        log.close()
        return self.popen

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, `grace` seconds, SIGKILL (straight to SIGKILL if `grace` is 0); always reaped."""
        if self.popen is None:
            return
        end_process(self.popen, grace, reap=10.0)
        self.popen = None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


class System:
    """An HTTP server under test. Subclasses fill in the wire format and the processes."""

    name: ClassVar[str]
    can_cancel: ClassVar[bool] = True

    def __init__(self, model: ModelSettings, threads: int, workdir: Path) -> None:
        self.model = model
        self.threads = threads
        self.workdir = workdir
        self.port = 0
        self.process: Process | None = None
        self.starts = 0

    @property
    def label(self) -> str:
        return self.name

    # Lifecycle.

    def argv(self) -> list[str]:
        raise NotImplementedError

    def launch(self) -> None:
        self.port = free_port()
        self.starts += 1
        slug = re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")  # two layouts of one system: two logs
        self.process = Process(self.argv(), self.workdir / f"{slug}-{self.starts}.log")
        self.process.start()

    def is_ready(self) -> bool:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process and self.process.alive(), f"{self.name} exited early:\n{self.process and self.process.log_tail()}"
            try:
                if self.is_ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready in {timeout} s:\n{self.process and self.process.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        if self.process:
            self.process.stop(grace)

    def restart(self) -> None:
        """What a user of a server that cannot stop does: kill it (a graceful stop would wait
        for the generation it cannot stop) and start it again."""
        self.stop(grace=0)
        self.launch()
        self.wait_ready()

    # Requests.

    def open(self, message: str, max_tokens: int = LONG_REPLY, **extra: Any) -> SSEStream:
        raise NotImplementedError

    def cancel(self, stream: SSEStream) -> dict[str, Any]:
        raise NotImplementedError(f"{self.name} has no cancel; only a disconnect stops it")

    def completion_body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        return {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "stop": STOPS, **SAMPLING}

    def open_completion(self, message: str, max_tokens: int) -> SSEStream:
        """A streaming `/v1/completions` of the message's transcript: the one wire format every
        system here speaks, so the concurrency section asks them all the same way."""
        return SSEStream(self.port, "/v1/completions", self.completion_body(transcript(message), max_tokens),
                         translate=openai_events)

    def chat_body(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        # No stop strings: each server renders the messages its own way and knows its turn ends.
        return {"messages": messages, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **SAMPLING}

    def open_chat(self, messages: list[dict[str, str]], max_tokens: int) -> SSEStream:
        """A streaming `/v1/chat/completions` of these messages, greedy, `max_tokens` at most."""
        return SSEStream(self.port, "/v1/chat/completions", self.chat_body(messages, max_tokens),
                         translate=openai_events)

    def compute_pid(self, stream: SSEStream) -> int:
        assert self.process
        return self.process.pid  # one process does everything

    def processes(self) -> dict[str, int]:
        assert self.process
        return {"server": self.process.pid}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "threads": self.threads, "argv": self.argv()}


def kv_ram_dir(workdir: Path) -> Path:
    """This benchmark process's own RAM tier for Edison's saved KV states, in tmpfs as shipped:
    no run finds another's conversations (a warm first turn would be a lie), and it is removed
    when the process exits. (The disk tier goes into the run's workdir.)"""
    path = Path("/dev/shm") / f"edison-bench-{os.getpid()}"
    if not _ram_dirs:
        atexit.register(lambda: [shutil.rmtree(p, ignore_errors=True) for p in _ram_dirs])
    _ram_dirs.add(path)
    return path


_ram_dirs: set[Path] = set()


class Edison(System):
    name = "edison"

    def __init__(
        self, model: ModelSettings, threads: int, workdir: Path, workers: int = 1, queue_size: int = 16, slots: int = 4,
        pool: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, threads, workdir)
        self.workers = workers
        self.slots = slots
        self.queue_size = queue_size
        self.pool = pool or {}  # more [pool] settings (the soak runs config.toml's whole [pool])
        self.config_path = workdir / f"edison-{workers}w-{threads}t-{slots}s.toml"
        self.worker_pids: set[int] = set()

    @property
    def label(self) -> str:
        return f"edison ({self.workers}x{self.threads}, {self.slots} slot{'s' if self.slots != 1 else ''})"

    def config(self) -> str:
        modes = "".join(
            f'\n[modes.n{n}]\nsystem_prompt = ""\nmax_tokens = {n}\n'
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in SAMPLING.items())
            for n in REPLY_LENGTHS
        )
        model = asdict(replace(self.model, threads=self.threads))
        return (
            f'default_mode = "n{LONG_REPLY}"\n'
            '[server]\nhost = "127.0.0.1"\nlog_level = "info"\n'
            "[model]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in model.items())
            + "[pool]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.pool_settings().items())
            + f"[kv_cache]\nram_dir = {json.dumps(str(kv_ram_dir(self.workdir)))}\n"
            + f"disk_dir = {json.dumps(str(self.workdir / 'kv-disk'))}\n"
            + "[debug]\nallow_wedge = true\n" + modes
        )

    def pool_settings(self) -> dict[str, Any]:
        base = {"cancel_deadline_s": 1.0, "kill_grace_s": 0.2, "prefill_chunk": 512}
        return {**base, **self.pool, "workers": self.workers, "slots": self.slots, "queue_size": self.queue_size}

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "edison", "serve", "--config", str(self.config_path), "--port", str(self.port)]

    def launch(self) -> None:
        self.config_path.write_text(self.config())
        super().launch()

    def health(self, verbose: bool = False) -> dict[str, Any]:
        _, report = http_json(self.port, "GET", "/health?verbose=1" if verbose else "/health", timeout=5)
        self.worker_pids |= set(report.get("workers", {}).get("pids", []))
        return report

    def is_ready(self) -> bool:
        return self.health()["workers"]["ready"] >= self.workers

    def stop(self, grace: float = 10.0) -> None:
        try:
            if self.process and self.process.alive():
                self.health()  # remember the current workers, to be sure they are gone
        except (OSError, ValueError, KeyError):
            pass
        super().stop(grace)
        for pid in self.worker_pids:
            kill_pid(pid)

    def open(self, message: str, max_tokens: int = LONG_REPLY, **extra: Any) -> SSEStream:
        return SSEStream(self.port, "/chat/stream", {"message": message, "mode": f"n{max_tokens}", **extra})

    def cancel(self, stream: SSEStream) -> dict[str, Any]:
        request_id = stream.wait_for("init", 30).data["request_id"]
        return http_json(self.port, "POST", "/chat/cancel", {"request_id": request_id})[1]

    def completion_body(self, prompt: str, max_tokens: int) -> dict[str, Any]:
        """Edison's /v1 takes the OpenAI fields only: top_k, min_p and repeat_penalty come from the
        mode (`edison-n<len>`, built from SAMPLING); usage tells how many tokens a chunk merged."""
        return {"prompt": prompt, "stop": STOPS, **self._openai_fields(max_tokens)}

    def chat_body(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        return {"messages": messages, **self._openai_fields(max_tokens)}  # its transcript format adds its stop

    def _openai_fields(self, max_tokens: int) -> dict[str, Any]:
        mode = min((n for n in REPLY_LENGTHS if n >= max_tokens), default=LONG_REPLY)
        openai = {k: SAMPLING[k] for k in ("temperature", "top_p", "seed")}
        return {"model": f"edison-n{mode}", "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}, **openai}

    def kills(self) -> float:
        """`edison_worker_kills_total` from /metrics: workers the pool itself killed."""
        return metric(self.port, "edison_worker_kills_total")

    def compute_pid(self, stream: SSEStream) -> int:
        """The worker running this request, from /health?verbose=1."""
        request_id = stream.wait_for("init", 30).data["request_id"]
        found: list[int] = []

        def running() -> bool:
            details = self.health(verbose=True)["worker_details"]
            found[:] = [w["pid"] for w in details if request_id in w["request_ids"]]
            return bool(found)

        if not wait_until(running, timeout=30, interval=0.01):
            raise TimeoutError(f"request {request_id} never reached a worker")
        return found[0]

    def processes(self) -> dict[str, int]:
        assert self.process
        details = self.health(verbose=True)["worker_details"]
        return {"web": self._server_pid(), **{f"worker {w['index']}": w["pid"] for w in details}}

    def _server_pid(self) -> int:
        assert self.process
        return self.process.pid  # the shim exec()s, so the Popen pid is the server itself

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "workers": self.workers, "slots": self.slots, "config": self.config()}


class Seed(System):
    """The seed's design: benchmarks/baselines/seed_server.py, with flash attention on (its
    `Llama` takes it). It has no /v1: `open_completion` is its own stream, the same request."""

    name = "seed"

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.baselines.seed_server", "--model", self.model.path,
                "--threads", str(self.threads), "--flash-attn", "--port", str(self.port)]

    def is_ready(self) -> bool:
        return http_json(self.port, "GET", "/", timeout=2)[0] == 404  # uvicorn answers once the model is loaded

    def open(self, message: str, max_tokens: int = LONG_REPLY, **extra: Any) -> SSEStream:
        options = {"max_tokens": max_tokens, "stop": STOPS, **SAMPLING}
        return SSEStream(self.port, "/chat/stream", {"prompt": transcript(message), "options": options})

    def cancel(self, stream: SSEStream) -> dict[str, Any]:
        request_id = stream.wait_for("init", 30).data["request_id"]
        return http_json(self.port, "POST", "/chat/cancel", {"request_id": request_id})[1]

    def open_completion(self, message: str, max_tokens: int) -> SSEStream:
        return self.open(message, max_tokens)


class LlamaCppServer(System):
    """llama-cpp-python's bundled OpenAI-compatible server. It has no cancel: a client stops
    a generation only by disconnecting. It runs one generation at a time; by default a new
    request *interrupts* the one streaming (`interrupt_requests`), which would cut concurrent
    replies short, so it is off here and requests wait their turn instead."""

    name = "llama-cpp-server"
    can_cancel = False

    def argv(self) -> list[str]:
        # --logits_all False: its default (True) also computes and copies the logits of every
        # prompt token, which would make its prefill slower than the others' and the fight unfair.
        # --flash_attn True: off by default there, and ~1.5x faster prefill here (config.toml).
        return [sys.executable, "-m", "llama_cpp.server", "--model", self.model.path, "--n_ctx", "8192",
                "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads), "--n_batch", "512",
                "--n_ubatch", "512", "--logits_all", "False", "--flash_attn", "True",
                "--interrupt_requests", "False", "--port", str(self.port), "--host", "127.0.0.1"]

    def is_ready(self) -> bool:
        return http_json(self.port, "GET", "/v1/models", timeout=2)[0] == 200

    def open(self, message: str, max_tokens: int = LONG_REPLY, **extra: Any) -> SSEStream:
        body = {"prompt": transcript(message), "max_tokens": max_tokens, "stream": True, "stop": STOPS, **SAMPLING}
        return SSEStream(self.port, "/v1/completions", body, translate=_openai_events)


def _openai_events(name: str, data: str, at: float) -> Event | None:
    if data.strip() == "[DONE]":
        return Event("done", {"ok": True}, at)
    chunk = json.loads(data)
    text = chunk["choices"][0].get("text") or ""
    return Event("token", {"t": text}, at) if text else None


def openai_events(name: str, data: str, at: float) -> Event | None:
    """Streaming `/v1/completions` or `/v1/chat/completions` of any system: `init` (a chunk with
    no text and no finish, as Edison sends first: its `id` is the request id `/chat/cancel`
    takes), `token`, `finish` (the finish_reason, and usage if the chunk has it), `usage` (a
    choiceless usage chunk), `done` ([DONE]), or `done` with ok false for an error object."""
    if data.strip() == "[DONE]":
        return Event("done", {"ok": True}, at)
    chunk = json.loads(data)
    if "error" in chunk:
        return Event("done", {"ok": False, "error": chunk["error"]}, at)
    if not chunk.get("choices"):
        return Event("usage", chunk.get("usage") or {}, at)
    choice = chunk["choices"][0]
    text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""  # completion or chat
    if choice.get("finish_reason"):
        return Event("finish", {"finish_reason": choice["finish_reason"], "usage": chunk.get("usage"),
                                "text": text}, at)
    if text:
        return Event("token", {"t": text}, at)
    return Event("init", {"request_id": chunk.get("id")}, at)


class LlamaServer(System):
    """llama.cpp's own C++ server, built by benchmarks/llama_server.py from the llama.cpp that
    llama-cpp-python vendors. Its own defaults (flash attention auto, -b 2048 -ub 512, a
    window-sized SWA cache, continuous batching), one slot unless `parallel` says more. No cancel:
    a client stops a generation by disconnecting."""

    name = "llama-server"
    can_cancel = False

    def __init__(self, model: ModelSettings, threads: int, workdir: Path, parallel: int = 1) -> None:
        super().__init__(model, threads, workdir)
        self.parallel = parallel  # slots; -c grows with them so that each keeps an 8192 context

    @property
    def label(self) -> str:
        return self.name if self.parallel == 1 else f"{self.name} -np {self.parallel}"

    def launch(self) -> None:
        llama_server.ensure_built(self.workdir / "llama-server-build.log")
        super().launch()

    def argv(self) -> list[str]:
        return [str(llama_server.binary_path()), "--model", self.model.path, "--ctx-size", str(8192 * self.parallel),
                "--threads", str(self.threads), "--threads-batch", str(self.threads), "--parallel", str(self.parallel),
                "--no-ui", "--host", "127.0.0.1", "--port", str(self.port)]

    def is_ready(self) -> bool:
        return http_json(self.port, "GET", "/health", timeout=2)[0] == 200

    def open(self, message: str, max_tokens: int = LONG_REPLY, **extra: Any) -> SSEStream:
        body = {"prompt": transcript(message), "n_predict": max_tokens, "stream": True, "stop": STOPS, **SAMPLING}
        return SSEStream(self.port, "/completion", body, translate=_llama_server_events)


def _llama_server_events(name: str, data: str, at: float) -> Event | None:
    """/completion chunks: one per token while `stop` is false, then one with `stop` true."""
    chunk = json.loads(data)
    if "error" in chunk:
        return Event("done", {"ok": False, "error": chunk["error"]}, at)
    if not chunk.get("stop"):
        return Event("token", {"t": chunk.get("content", "")}, at)
    usage = {"prompt_tokens": chunk.get("tokens_evaluated"), "completion_tokens": chunk.get("tokens_predicted")}
    return Event("done", {"ok": True, "usage": usage, "timings": chunk.get("timings")}, at)


SYSTEMS: dict[str, type[System]] = {cls.name: cls for cls in (Edison, LlamaServer, Seed, LlamaCppServer)}


class InProcess:
    """llama-cpp-python called in-process (benchmarks/baselines/inprocess.py): the reference
    for Edison's throughput overhead. Not a server: it answers JSON lines on a pipe."""

    name = "llama-cpp-python in-process"

    def __init__(self, model: ModelSettings, threads: int, workdir: Path) -> None:
        self.threads = threads
        argv = [sys.executable, "-m", "benchmarks.baselines.inprocess", "--model", model.path,
                "--threads", str(threads), "--settings", json.dumps(asdict(model))]
        self.process = Process(argv, workdir / "inprocess.log")

    @property
    def label(self) -> str:
        return f"in-process ({self.threads}t)"

    def launch(self) -> None:
        self.process.start(stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def wait_ready(self, timeout: float = 180.0) -> None:
        self._read()  # "ready"

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        popen = self.process.popen
        assert popen and popen.stdin
        popen.stdin.write((json.dumps(request) + "\n").encode())
        popen.stdin.flush()
        return json.loads(self._read())

    def _read(self) -> str:
        popen = self.process.popen
        assert popen and popen.stdout
        line = popen.stdout.readline()
        if not line:
            raise RuntimeError(f"in-process runner exited:\n{self.process.log_tail()}")
        return line.decode()

    def stop(self) -> None:
        popen = self.process.popen
        if popen and popen.stdin:
            popen.stdin.close()
        if popen and popen.stdout:
            popen.stdout.close()
        self.process.stop(grace=5)

    def processes(self) -> dict[str, int]:
        return {"process": self.process.pid}

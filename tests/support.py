"""Test plumbing: a real `edison serve` subprocess on a free loopback port, an SSE reader,
and CPU-time probes. Every process a test starts is ended by pid, even when the test fails.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from benchmarks.client import Event, SSEStream, StreamTimeout, alive, end_process, free_port, kill_pid, wait_until

__all__ = ["Event", "alive", "free_port", "kill_pid", "wait_until"]  # shared with the benchmarks

REPO = Path(__file__).resolve().parent.parent

# The tests run on Gemma 3 270M, the bundled base model: its greedy continuation of an explicit
# count is the same on every x86-64 CPU tried (Intel and AMD, AVX2 and AVX-512) and in any batch
# shape, which an instruction ("Count from 1 to ...") is not. The default model, SmolLM2 135M
# Instruct, has tests of its own (test_default_model.py).
TEST_MODEL = "gemma3-270m"

# A workload whose next token is never in doubt: the model goes on counting for as long as it is
# allowed, so a lost or repeated token shows as a gap or a repeat in the numbers (consecutive()).
COUNTING = ", ".join(str(n) for n in range(1, 41)) + ","


def consecutive(text: str) -> bool:
    """n, n+1, n+2, ... with none lost or repeated. The model writes a number digit by digit, so a
    stream stopped mid-number ends on a prefix of the next one ("9, 1" for "9, 10")."""
    numbers = re.findall(r"\d+", text)
    if not numbers:
        return False
    first = int(numbers[0])
    whole = [int(n) for n in numbers[:-1]] == list(range(first, first + len(numbers) - 1))
    return whole and str(first + len(numbers) - 1).startswith(numbers[-1])


def long_prompt(tokens: int = 6000) -> str:
    """About `tokens` tokens of varied text (~1.3 tokens per word on the bundled model)."""
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    n = int(tokens / 1.3)
    return " ".join(f"{words[i % len(words)]}{i % 97}" if i % 5 == 0 else words[i % len(words)] for i in range(n))


BASE_CONFIG: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "log_level": "info", "max_body_bytes": 200_000},
    "model": {"path": TEST_MODEL, "n_ctx": 8192},
    "pool": {"workers": 2, "slots": 2, "queue_size": 4, "cancel_deadline_s": 1.0, "prefill_chunk": 512},
    "debug": {"allow_wedge": True},
    "modes": {
        "chat": {"description": "greedy chat", "system_prompt": "You are a helpful assistant.", "temperature": 0.0,
                 "seed": 1, "max_tokens": 48, "repeat_penalty": 1.0},
        "brief": {"description": "four tokens", "temperature": 0.0, "seed": 1, "max_tokens": 4},
        "long": {"description": "greedy, long replies", "system_prompt": "", "temperature": 0.0, "seed": 1,
                 "max_tokens": 3000, "repeat_penalty": 1.0},
        "count": {"description": "greedy, 64 tokens: with COUNTING, a checkable count", "system_prompt": "",
                  "temperature": 0.0, "seed": 1, "max_tokens": 64, "repeat_penalty": 1.0},
    },
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def write_config(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """A config file; its saved KV states live beside it (never shared with another test's)."""
    config = json.loads(json.dumps(BASE_CONFIG))
    config["kv_cache"] = {"ram_dir": str(path.parent / f"{path.stem}-kv-ram"),
                          "disk_dir": str(path.parent / f"{path.stem}-kv-disk")}
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values  # a top-level key: default_model
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]  # default_model, ...
    for section, values in config.items():
        if not isinstance(values, dict):
            continue
        if section in ("modes", "models"):
            for name, table in values.items():
                lines.append(f"[{section}.{name}]")
                lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Service:
    """A real `python -m edison serve` process."""

    config: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    known_pids: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_ready: bool = True, extra_args: tuple[str, ...] = (), new_session: bool = False) -> Service:
        """`new_session`: the service leads its own process group, so a test can signal the group."""
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edison", "serve", "--config", str(self.config), "--port", str(self.port), *extra_args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=new_session,
        )
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 90.0, workers: int | None = None) -> dict[str, Any]:
        """Until /health is 200 and every configured worker (or, if given, that many) is ready:
        a test that spreads requests over workers must not find one still loading."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc and self.proc.poll() is None, f"service exited early:\n{self.log()}"
            try:
                r = httpx.get(f"{self.url}/health", timeout=2)
                wanted = workers if workers is not None else r.json()["workers"]["total"]
                if r.status_code == 200 and r.json()["workers"]["ready"] >= wanted:
                    self.remember_children()
                    return r.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"service not ready in {timeout} s:\n{self.log()}")

    def remember_children(self) -> None:
        if self.proc:
            try:
                self.known_pids |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
            except psutil.Error:
                pass

    def health(self, verbose: bool = False) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", params={"verbose": "1"} if verbose else None, timeout=5).json()

    def worker_pids(self) -> list[int]:
        pids = self.health()["workers"]["pids"]
        self.known_pids |= set(pids)
        return pids

    def worker_for(self, request_id: str, timeout: float = 10.0) -> int:
        """The pid of the worker running `request_id`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for w in self.health(verbose=True)["worker_details"]:
                if request_id in w["request_ids"]:
                    self.known_pids.add(w["pid"])
                    return w["pid"]
            time.sleep(0.02)
        raise AssertionError(f"request {request_id} never ran on a worker")

    def wait_replaced(self, old_pid: int, workers: int, within: float = 60.0) -> list[int]:
        """Until `workers` are ready again and `old_pid` is not among them."""
        deadline = time.monotonic() + within
        while True:
            health = self.health()
            pids = health["workers"]["pids"]
            if health["workers"]["ready"] == workers and old_pid not in pids and len(pids) == workers:
                self.known_pids |= set(pids)
                return pids
            assert time.monotonic() < deadline, f"pool not back to {workers} ready workers: {health}"
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cancel(self, request_id: str) -> dict[str, Any]:
        return httpx.post(f"{self.url}/chat/cancel", json={"request_id": request_id}, timeout=5).json()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; then every worker pid this service ever had, by pid."""
        if self.proc and self.proc.poll() is None:
            self.remember_children()
            end_process(self.proc, grace=15.0)
        for pid in self.known_pids:
            kill_pid(pid)
        if hasattr(self, "_log"):
            self._log.close()


# SSE.


# Every stream a test opens, so the `hang_up_streams` fixture can close what a failed test left
# running: a long count would otherwise hold its slot and time out the next test on that service.
OPEN_STREAMS: list[Stream | RawStream] = []


def hang_up_open_streams() -> None:
    """A disconnect is a cancel: the server stops each stream's generation within its usual bounds."""
    while OPEN_STREAMS:
        OPEN_STREAMS.pop().disconnect()


class Stream(SSEStream):
    """A `/chat/stream` call read on a background thread over a bare socket (the benchmarks'
    reader); events land in `events`, each stamped with its arrival time."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        super().__init__(int(url.rsplit(":", 1)[1]), "/chat/stream", body)
        OPEN_STREAMS.append(self)

    def wait_for(self, name: str, timeout: float = 60.0, count: int = 1) -> Event:
        try:
            return super().wait_for(name, timeout, count)
        except StreamTimeout as exc:
            raise AssertionError(str(exc)) from None

    @property
    def request_id(self) -> str:
        return self.wait_for("init").data["request_id"]

    @property
    def done(self) -> Event:
        return self.wait_for("done", timeout=120)

    def text(self) -> str:
        return "".join(e.data["t"] for e in self.events if e.name == "token")


def parse_sse(lines: Iterator[str]) -> Iterator[Event]:
    name, data = "message", ""
    for line in lines:
        if not line:
            if data:
                yield Event(name, json.loads(data), time.monotonic())
            name, data = "message", ""
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def chat(url: str, message: str, mode: str = "chat", history: list | None = None, timeout: float = 120) -> list[Event]:
    """A whole /chat/stream call, read to the end."""
    body: dict[str, Any] = {"message": message, "mode": mode}
    if history is not None:
        body["history"] = history
    with httpx.Client(timeout=timeout) as client:
        with client.stream("POST", f"{url}/chat/stream", json=body) as response:
            assert response.status_code == 200, response.read()
            return list(parse_sse(response.iter_lines()))


# CPU-time probes.


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def wait_idle(pid: int, within: float = 3.0, window: float = 0.1, busy_below: float = 0.02) -> float:
    """Seconds until `pid` spends less than `busy_below` CPU-seconds in one `window`."""
    start = time.monotonic()
    last = cpu_seconds(pid)
    while time.monotonic() - start < within:
        time.sleep(window)
        now = cpu_seconds(pid)
        if now - last < busy_below:
            return time.monotonic() - start
        last = now
    raise AssertionError(f"worker {pid} still computing {within} s after the cancel")


def wait_busy(pid: int, within: float = 30.0, cpu: float = 0.5) -> None:
    """Until `pid` has burnt `cpu` CPU-seconds more than now: it is computing."""
    start_cpu, deadline = cpu_seconds(pid), time.monotonic() + within
    while cpu_seconds(pid) - start_cpu < cpu:
        assert time.monotonic() < deadline, f"worker {pid} never got busy"
        time.sleep(0.02)


class RawStream:
    """A /chat/stream call over a bare socket, so a test can hang up at any moment
    (httpx cannot close a response from another thread while it is blocked reading)."""

    def __init__(self, port: int, body: dict[str, Any]) -> None:
        payload = json.dumps(body).encode()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall(
            b"POST /chat/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        self.received = b""
        OPEN_STREAMS.append(self)

    def read_until(self, marker: bytes, timeout: float = 60.0, count: int = 1) -> bytes:
        deadline = time.monotonic() + timeout
        while self.received.count(marker) < count:
            assert time.monotonic() < deadline, f"no {marker!r} in {self.received[-500:]!r}"
            chunk = self.sock.recv(65536)
            assert chunk, f"connection closed before {marker!r}"
            self.received += chunk
        return self.received

    @property
    def request_id(self) -> str:
        data = self.read_until(b'"request_id"')
        self.read_until(b"}\n")
        start = data.index(b'"request_id": "') + len(b'"request_id": "')
        return data[start : start + 36].decode()

    def disconnect(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

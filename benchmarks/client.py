"""Client-side instruments, shared by every system and by the tests (tests/support.py): an SSE
stream over a bare socket, a CPU-time probe, and the process helpers (free port, kill by pid).

The stream is read on its own thread over a plain socket (not httpx) so that a benchmark
can hang up at any moment, including while the server is silent inside a long prefill:
`disconnect()` shuts the socket down under the blocked reader. Every event is stamped with
`time.monotonic()` when its bytes arrived.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil


@dataclass(frozen=True)
class Event:
    name: str  # init, token, progress, queued, done, http_error (a system maps its own wire format)
    data: Any
    at: float  # time.monotonic() when it arrived


# Turns one SSE block (its `event:` name and its `data:` text) into an Event, or None to skip it.
Translate = Callable[[str, str, float], "Event | None"]


def json_events(name: str, data: str, at: float) -> Event | None:
    """Edison's contract (and the seed's): named events with JSON data."""
    return Event(name, json.loads(data), at)


class StreamTimeout(Exception):
    pass


class SSEStream:
    """One streaming POST, read on a background thread; `events` fills as bytes arrive."""

    def __init__(self, port: int, path: str, body: dict[str, Any], translate: Translate = json_events) -> None:
        self.path = path
        self.events: list[Event] = []
        self.status: int | None = None
        self.headers: dict[str, str] = {}  # lower-case names
        self.error: BaseException | None = None
        self.disconnected_at: float | None = None
        self.closed = threading.Event()
        self._translate = translate
        self._changed = threading.Condition()
        payload = json.dumps(body).encode()
        self.sent_at = time.monotonic()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=None)
        self.sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload
        )
        self._thread = threading.Thread(target=self._run, name="bench-sse", daemon=True)
        self._thread.start()

    # Reading.

    def _run(self) -> None:
        try:
            self._read()
        except OSError as exc:
            if self.disconnected_at is None:
                self.error = exc
        except Exception as exc:  # noqa: BLE001 - surfaced to the benchmark through .error
            self.error = exc
        finally:
            self.closed.set()
            with self._changed:
                self._changed.notify_all()

    def _chunks(self) -> Any:
        while True:
            data = self.sock.recv(65536)
            if not data:
                return
            yield data, time.monotonic()

    def _read(self) -> None:
        buf, chunks = b"", self._chunks()
        while b"\r\n\r\n" not in buf:
            data, _ = next(chunks)
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        self.headers = headers
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        length = None if chunked else int(headers.get("content-length", -1))
        body = _Dechunker() if chunked else None
        text, received = b"", 0
        for data, at in itertools.chain([(buf, time.monotonic())], chunks):
            text += body.feed(data) if body else data
            received += len(data)
            if self.status == 200:
                text = self._parse_blocks(text, at)
            # Stop at the end of the body: a kept-alive connection would not close for seconds.
            if (body and body.finished) or (length is not None and 0 <= length <= received):
                break
        if self.status != 200:
            try:
                detail = json.loads(text)
            except ValueError:
                detail = {"body": text.decode(errors="replace")}
            self._add(Event("http_error", {"status": self.status, **detail}, time.monotonic()))

    def _parse_blocks(self, text: bytes, at: float) -> bytes:
        text = text.replace(b"\r\n", b"\n")
        while b"\n\n" in text:
            block, text = text.split(b"\n\n", 1)
            name, data = "message", []
            for line in block.decode("utf-8", "replace").split("\n"):
                if line.startswith("event:"):
                    name = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())
            if data:
                event = self._translate(name, "\n".join(data), at)
                if event is not None:
                    self._add(event)
        return text

    def _add(self, event: Event) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    # Asking.

    def wait_for(self, name: str, timeout: float, count: int = 1) -> Event:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [e for e in self.events if e.name == name]
                if len(found) >= count:
                    return found[count - 1]
                if self.closed.is_set():
                    raise StreamTimeout(f"stream ended without {name!r} #{count}: {self.names()} {self.error!r}")
                if time.monotonic() > deadline:
                    raise StreamTimeout(f"no {name!r} #{count} within {timeout} s: {self.names()}")
                self._changed.wait(0.05)

    def first(self, name: str) -> Event | None:
        with self._changed:
            return next((e for e in self.events if e.name == name), None)

    def count(self, name: str, before: float | None = None) -> int:
        with self._changed:
            return sum(e.name == name and (before is None or e.at < before) for e in self.events)

    def names(self) -> list[str]:
        with self._changed:
            return [e.name for e in self.events]

    # Hanging up.

    def disconnect(self) -> float:
        """A hard hang-up, like a closed browser tab; returns its time.monotonic()."""
        self.disconnected_at = time.monotonic()
        self.close()
        return self.disconnected_at

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self._thread.join(timeout=5)


class _Dechunker:
    """Incremental HTTP/1.1 chunked transfer decoding."""

    def __init__(self) -> None:
        self.raw = b""
        self.finished = False

    def feed(self, data: bytes) -> bytes:
        self.raw += data
        out = b""
        while not self.finished:
            if b"\r\n" not in self.raw:
                break
            size_line, rest = self.raw.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                self.finished = True
                break
            if len(rest) < size + 2:
                break
            out += rest[:size]
            self.raw = rest[size + 2 :]
        return out


# CPU time.


class CpuProbe:
    """Samples one process's own CPU time (user + system, psutil) every `interval` seconds,
    and how many of its threads are runnable (state R in /proc/PID/task/*/stat).

    Linux reports CPU time in clock ticks (10 ms), so a stop is located to about 10 ms.
    A process that is gone or a zombie counts as idle from the first sample that sees it so.
    """

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float | None]] = []  # (monotonic, CPU seconds or None if gone)
        self.runnable: list[int] = []  # per sample: threads running or waiting for a CPU
        self.gone_at: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        try:
            self._process: psutil.Process | None = psutil.Process(pid)
        except psutil.Error:
            self._process = None
        self._thread = threading.Thread(target=self._run, name=f"bench-cpu-{pid}", daemon=True)

    def __enter__(self) -> CpuProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _read(self) -> tuple[float, int] | None:
        """(CPU seconds, threads in state R), or None if the process is gone or a zombie."""
        if self._process is None:
            return None
        try:
            runnable = 0
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{tid}/stat", "rb") as f:
                    stat = f.read()
                state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
                if state == b"Z" and tid == str(self.pid):
                    return None
                runnable += state == b"R"
            t = self._process.cpu_times()
            return t.user + t.system, runnable
        except (OSError, ValueError, psutil.Error):
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            read, now = self._read(), time.monotonic()
            with self._lock:
                self.samples.append((now, read[0] if read else None))
                self.runnable.append(read[1] if read else 0)
                if read is None and self.gone_at is None:
                    self.gone_at = now
            self._stop.wait(self.interval)

    def _snapshot(self, start: int = 0) -> list[tuple[float, float | None, int]]:
        """Samples from index `start` on, each with its runnable-thread count."""
        with self._lock:
            return [(t, c, r) for (t, c), r in zip(self.samples[start:], self.runnable[start:], strict=True)]

    def rate(self, start: float, end: float) -> float | None:
        """CPU seconds per second between two moments (how many cores it kept busy)."""
        inside = [(t, c) for t, c, _ in self._snapshot() if start <= t <= end and c is not None]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 0.05:
            return None
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def idle_after(self, t0: float, timeout: float, window: float = 0.15, slack: float = 0.015) -> float | None:
        """Seconds from `t0` until the process went quiet: the first sample after which it
        spends at most `slack` CPU-seconds in `window` with its threads hardly ever runnable
        (or is gone). None if it is still busy at `timeout`."""
        with self._lock:
            i = next((k for k, (t, _) in enumerate(self.samples) if t >= t0), len(self.samples))
        while True:
            samples = self._snapshot(i)  # only what is still undecided: the window after i
            k = 0
            while k < len(samples):
                verdict = _quiet_from(samples, k, window, slack)
                if verdict is None:
                    break  # the window is not covered yet
                if verdict:
                    return max(0.0, samples[k][0] - t0)
                k += 1
            i += k
            if time.monotonic() - t0 > timeout:
                return None
            time.sleep(0.02)


def _quiet_from(samples: list[tuple[float, float | None, int]], i: int, window: float, slack: float) -> bool | None:
    """Whether the process was quiet for `window` from sample i: it gained at most `slack`
    CPU-seconds, and its threads were hardly ever runnable (a process starved of CPU by other
    work on the machine gains no CPU time either, but its threads stay in state R)."""
    t_i, c_i, r_i = samples[i]
    if c_i is None:
        return True
    runnable = [r_i > 0]
    for t_j, c_j, r_j in samples[i + 1 :]:
        if c_j is None:
            return True
        runnable.append(r_j > 0)
        if c_j - c_i > slack or sum(runnable) > max(1, len(runnable) // 10):
            return False
        if t_j >= t_i + window:
            return True
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def end_process(popen: subprocess.Popen[Any], grace: float, reap: float = 5.0) -> None:
    """SIGTERM, `grace` seconds, then SIGKILL (straight to SIGKILL if `grace` is 0); always reaped."""
    if popen.poll() is not None:
        return
    popen.send_signal(signal.SIGTERM if grace else signal.SIGKILL)
    try:
        popen.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout=reap)


def kill_pid(pid: int) -> None:
    """SIGKILL a process this run started (or its service spawned), unless already gone."""
    try:
        if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            os.kill(pid, signal.SIGKILL)
    except (psutil.Error, ProcessLookupError):
        pass


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()

"""systemd integration, against a real service and a real AF_UNIX datagram socket this test owns:
READY, STATUS, WATCHDOG and STOPPING arrive in order and only from the service's main process
(SCM_CREDENTIALS names each sender), workers never see NOTIFY_SOCKET, SIGTERM ends with every
worker reaped by the service itself, a wedged pool supervisor stops the watchdog pings while
the event loop still serves, and the unit file verifies."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from edison.notify import Notifier
from edison.settings import load_settings
from tests.support import COUNTING, REPO, Service, Stream, alive, write_config

pytestmark = pytest.mark.timeout(180)

PR_SET_CHILD_SUBREAPER = 36
NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass
class Datagram:
    at: float
    pid: int
    lines: list[str]


@dataclass
class NotifySocket:
    """What systemd would listen on: a datagram socket that learns each sender's pid."""

    path: Path
    received: list[Datagram] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.changed = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closed:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
            except socket.timeout:
                continue
            except OSError:
                return
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[: struct.calcsize("3i")])[0]
            with self.changed:
                self.received.append(Datagram(time.monotonic(), pid, data.decode().split("\n")))
                self.changed.notify_all()

    def lines(self) -> list[tuple[float, str]]:
        with self.changed:
            return [(d.at, line) for d in self.received for line in d.lines]

    def wait_for(self, line: str, count: int = 1, timeout: float = 90.0) -> float:
        """The arrival time of the `count`-th datagram line equal to (or starting with) `line`."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                hits = [at for at, got in self.lines() if got == line or got.startswith(line)]
                if len(hits) >= count:
                    return hits[count - 1]
                assert time.monotonic() < deadline, f"no {line!r} #{count}; got {self.lines()}"
                self.changed.wait(0.1)

    def close(self) -> None:
        self.closed = True
        self.thread.join(timeout=2)
        self.sock.close()


class NotifiedService(Service):
    """Service.start, with NOTIFY_SOCKET and WATCHDOG_USEC in the environment (Service.start strips them)."""

    notify_env: dict[str, str]

    def start(self, wait_ready: bool = True, extra_args: tuple[str, ...] = ()) -> Service:
        self._log = open(self.log_path, "ab")
        env = {k: v for k, v in os.environ.items() if k not in NOTIFY_ENV} | self.notify_env
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edison", "serve", "--config", str(self.config), "--port", str(self.port), *extra_args],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )
        if wait_ready:
            self.wait_ready()
        return self


@pytest.fixture
def notified(tmp_path: Path) -> Iterator:
    """Starts services wired to a fresh notify socket; stops them (by pid) and closes it."""
    started: list[tuple[NotifiedService, NotifySocket]] = []

    def make(overrides: dict | None = None, watchdog_usec: int = 1_000_000) -> tuple[NotifiedService, NotifySocket]:
        n = len(started)
        listener = NotifySocket(tmp_path / f"notify{n}.sock")
        svc = NotifiedService(write_config(tmp_path / f"config{n}.toml", overrides), tmp_path / f"service{n}.log")
        svc.notify_env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(watchdog_usec)}
        started.append((svc, listener))
        svc.start(wait_ready=False)
        return svc, listener

    try:
        yield make
    finally:
        for svc, listener in started:
            svc.stop()
            listener.close()


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Makes this test process the subreaper of its descendants: a worker the service failed to
    reap before exiting would become *our* child, visible to waitpid."""
    libc = ctypes.CDLL(None, use_errno=True)
    before = {p.pid for p in psutil.Process().children()}
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        for child in psutil.Process().children():  # reap only orphans adopted during this test
            if child.pid not in before:
                try:
                    child.kill()
                    os.waitpid(child.pid, 0)
                except (psutil.Error, ChildProcessError):
                    pass


def test_notify_ready_status_watchdog_stopping_in_order_and_only_from_the_main_process(notified, subreaper) -> None:
    svc, listener = notified({"pool": {"workers": 2}})
    ready_at = listener.wait_for("READY=1")
    svc.wait_ready(workers=2)
    main_pid = svc.proc.pid
    workers = svc.worker_pids()
    assert workers and main_pid not in workers
    for pid in workers:  # the parent removed them before spawning: not even the worker's start-up saw them
        leaked = [k for k in psutil.Process(pid).environ() if k in NOTIFY_ENV]
        assert not leaked, f"worker {pid} inherited {leaked}"

    # Five pings after READY at least, whatever the speed of what follows (the assertion below).
    listener.wait_for("WATCHDOG=1", count=len([1 for _, got in listener.lines() if got == "WATCHDOG=1"]) + 5, timeout=10)
    stream = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    stream.wait_for("token", count=2)
    listener.wait_for("STATUS=2/2 workers ready, 1 busy, 0 queued", timeout=5)
    svc.cancel(stream.request_id)
    assert stream.done.data["stopped"] is True
    workers = svc.worker_pids()

    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(timeout=30) == 0
    stopping_at = listener.wait_for("STOPPING=1", timeout=5)
    time.sleep(0.3)  # anything sent late would have arrived by now

    lines = listener.lines()
    names = [got.split("=", 1)[0] for _, got in lines]
    assert names.count("READY") == 1 and names.count("STOPPING") == 1
    ready, stopping = names.index("READY"), names.index("STOPPING")
    assert ready < stopping == len(names) - 2 and names[-1] == "STATUS"  # STOPPING=1 plus its STATUS, last
    assert "STATUS" in names[ready:stopping] and "WATCHDOG" in names[ready:stopping]
    assert "WATCHDOG" not in names[stopping:]
    pings = [at for at, got in lines if got == "WATCHDOG=1" and ready_at <= at <= stopping_at]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert len(pings) >= 5 and max(gaps) < 2.0, gaps  # every 0.5 s while alive; WatchdogSec is 1 s
    senders = {d.pid for d in listener.received}
    assert senders == {main_pid}, f"datagrams from {senders}; service {main_pid}, workers {workers}"
    for pid in workers:  # reaped by the service, not orphaned to us (the subreaper) or to init
        assert not alive(pid)
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_wedged_supervisor_stops_the_watchdog_pings_while_the_loop_still_serves(notified) -> None:
    svc, listener = notified({"pool": {"workers": 1}, "debug": {"allow_wedge": True, "stall_supervisor_after_s": 4.0}})
    listener.wait_for("WATCHDOG=1", count=2, timeout=30)
    deadline = time.monotonic() + 30
    while True:  # the pings must stop: no WATCHDOG=1 for 3 s (six missed half-periods)
        pings = [at for at, got in listener.lines() if got == "WATCHDOG=1"]
        if time.monotonic() - pings[-1] > 3.0:
            break
        assert time.monotonic() < deadline, f"watchdog pings never stopped ({len(pings)} so far)"
        time.sleep(0.1)
    assert "the pool supervisor hangs now" in svc.log()
    assert "withholding the systemd watchdog ping" in svc.log()

    svc.wait_ready(workers=1)  # the event loop still answers, and still reports to systemd
    stream = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    stream.wait_for("token", count=2)
    listener.wait_for("STATUS=1/1 workers ready, 1 busy", timeout=5)
    svc.cancel(stream.request_id)
    assert stream.done.data["stopped"] is True
    assert pings == [at for at, got in listener.lines() if got == "WATCHDOG=1"], "a ping slipped out"


def test_notifier_speaks_to_an_abstract_socket_and_ignores_another_process_watchdog(monkeypatch) -> None:
    name = f"edison-test-{uuid.uuid4()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))  # systemd's watchdog is for another process
    try:
        notifier = Notifier.from_environ()
        assert not [k for k in NOTIFY_ENV if k in os.environ]  # read once, then gone
        assert notifier.watchdog_s is None
        notifier.stopping()
        assert listener.recv(4096) == b"STOPPING=1\nSTATUS=stopping: ending streams, reaping workers"
        notifier.close()
    finally:
        listener.close()


def test_unit_file_verifies_and_bounds_the_graceful_shutdown(tmp_path: Path) -> None:
    rendered = subprocess.run(
        ["sh", str(REPO / "deploy" / "install-service.sh"), "--render", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )
    assert rendered.returncode == 0, rendered.stderr
    unit = tmp_path / "edison.service"
    text = unit.read_text()
    assert "/opt/edison" not in text
    keys = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert keys["ExecStart"].split()[0] == str(REPO / ".venv" / "bin" / "edison")
    assert f"--config {REPO / 'config.toml'}" in keys["ExecStart"]
    assert keys["Type"] == "notify" and keys["KillMode"] == "mixed" and keys["Restart"] == "on-failure"
    assert keys["NoNewPrivileges"] == "yes" and keys["ProtectSystem"] == "strict" and keys["PrivateTmp"] == "yes"
    assert keys["User"] == "edison"
    pool = load_settings(REPO / "config.toml").pool
    # uvicorn drains streams for cancel_deadline_s + 5 s, then the pool waits cancel_deadline_s + 1 s
    # for its workers and joins each for up to 5 s after a SIGKILL.
    graceful = (pool.cancel_deadline_s + 5) + (pool.cancel_deadline_s + 1) + 5
    assert float(keys["TimeoutStopSec"]) > graceful
    assert float(keys["WatchdogSec"]) >= 4  # pings every WatchdogSec/2; the heartbeat is stale after 1 s

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd; deploy/install-systemd-analyze.sh)")
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys or bad values ("..., ignoring"): any output is a failure.
    assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), verified.stdout + verified.stderr

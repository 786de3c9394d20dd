"""Test plumbing for tests/test_haproxy.py: a real `haproxy` process in front of real Edison
instances, configured by `edison haproxy-config` itself (edison/haproxy.py), on loopback ports.

Every process started here is ended by pid, even when a test fails.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from edison.haproxy import Address, ProxyConfig, render
from tests.support import Service, cpu_seconds, end_process, free_port, wait_idle

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def server_name(index: int) -> str:
    """The name `edison haproxy-config` gives the instance at `index` (0-based)."""
    return f"edison{index + 1}"


@dataclass
class Proxy:
    """`haproxy -db -f <rendered config>` in front of `backends`."""

    backends: list[Service]
    root: Path
    port: int = field(default_factory=free_port)
    stats_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "haproxy.cfg"

    @property
    def log_path(self) -> Path:
        return self.root / "haproxy.log"

    def render(self) -> str:
        config = ProxyConfig(
            bind=Address("127.0.0.1", self.port),
            backends=tuple(Address("127.0.0.1", svc.port) for svc in self.backends),
            stats=Address("127.0.0.1", self.stats_port),
            socket=str(self.root / "admin.sock"),
            user="",  # the tests' own user; the default (`haproxy`) needs root
        )
        return render(config)

    def start(self, wait_up: bool = True) -> Proxy:
        self.config_path.write_text(self.render())
        check = subprocess.run([HAPROXY, "-c", "-f", str(self.config_path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT)
        if wait_up:
            for i in range(len(self.backends)):
                self.wait_status(i, "UP")
        return self

    def stop(self) -> None:
        if self.proc:
            end_process(self.proc, grace=5.0)
        if hasattr(self, "_log"):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stats(self) -> dict[str, dict[str, str]]:
        """The stats page's CSV, one row per server name (and FRONTEND/BACKEND)."""
        text = httpx.get(f"http://127.0.0.1:{self.stats_port}/;csv", timeout=5).text.lstrip("# ")
        return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == "edison_instances"}

    def status(self, index: int) -> str:
        return self.stats()[server_name(index)]["status"]

    def wait_status(self, index: int, status: str, timeout: float = 30.0) -> float:
        """Seconds until the stats page shows instance `index` as `status` (UP, DOWN)."""
        start = time.monotonic()
        while True:
            assert self.proc and self.proc.poll() is None, f"haproxy exited:\n{self.log()}"
            try:
                if self.status(index).split()[0] == status:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            assert time.monotonic() - start < timeout, f"{server_name(index)} not {status} in {timeout} s:\n{self.log()}"
            time.sleep(0.05)


def owner(services: list[Service], request_id: str, timeout: float = 10.0) -> int:
    """The index of the instance that runs (or ran) `request_id`, from the instances' own logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [i for i, svc in enumerate(services) if request_id in svc.log()]
        if found:
            assert len(found) == 1, f"request {request_id} in the logs of instances {found}"
            return found[0]
        time.sleep(0.02)
    raise AssertionError(f"request {request_id} reached no instance")


def wait_stopped(pid: int, within: float = 3.0) -> float:
    """`wait_idle`, then a whole second below 10 % of a core: on this shared 2-core box one idle
    0.1 s window can also be a busy worker that got no CPU for a moment."""
    took = wait_idle(pid, within=within)
    before = cpu_seconds(pid)
    time.sleep(1.0)
    used = cpu_seconds(pid) - before
    assert used < 0.1, f"worker {pid} still computing: {used:.2f} CPU-s in the second after it looked idle"
    return took


def cancel_everything(services: list[Service]) -> None:
    """Cleanup after a failed test: cancel whatever each instance still runs, at the instance."""
    for svc in services:
        try:
            for worker in svc.health(verbose=True)["worker_details"]:
                for request_id in filter(None, worker["request_ids"]):
                    svc.cancel(request_id)
        except httpx.HTTPError:
            pass

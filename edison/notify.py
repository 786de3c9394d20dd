"""systemd's notify protocol (sd_notify(3)), spoken directly: datagrams to $NOTIFY_SOCKET.

- `READY=1` once, when the first worker has loaded the model (Type=notify waits for it);
- `STATUS=...` whenever the pool's counts change (`systemctl status` shows the last one);
- `WATCHDOG=1` every WatchdogSec/2, but only while the pool supervisor's heartbeat is fresh.
  `tick()` runs on the event loop (uvicorn's main loop calls it every 0.1 s), so a blocked
  loop stops the pings, and a wedged or dead supervisor stops them through its heartbeat:
  either way systemd kills and restarts the service (Restart=on-failure);
- `STOPPING=1` when shutdown starts.

`from_environ` removes NOTIFY_SOCKET/WATCHDOG_* from os.environ once read, before any worker
is spawned: only the service's main process may talk to systemd (the worker strips them too).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edison.pool import Pool

logger = logging.getLogger("edison")

ENV_NAMES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
MIN_STALE_S = 1.0  # four supervisor ticks: a heartbeat older than this means a wedged supervisor


class Notifier:
    def __init__(self, address: str | None, watchdog_s: float | None = None) -> None:
        # "@name" is an abstract socket: the leading "@" stands for a NUL byte.
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_s = watchdog_s
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if address else None
        self.ready = False
        self.status = ""
        self.last_ping = float("-inf")
        self.withholding = False  # logged once per stale period, not every tick

    @classmethod
    def from_environ(cls) -> Notifier:
        """Reads the notify variables and removes them from os.environ, so no child inherits them."""
        address, usec, pid = (os.environ.pop(name, None) for name in ENV_NAMES)
        watchdog_s = None
        if usec and (not pid or pid == str(os.getpid())):  # WATCHDOG_PID names another process: not ours
            try:
                watchdog_s = int(usec) / 1_000_000 or None
            except ValueError:
                logger.warning("Ignoring WATCHDOG_USEC=%r: not a number of microseconds", usec)
        if address:
            watchdog = f"watchdog every {watchdog_s / 2:.1f} s" if watchdog_s else "no watchdog"
            logger.info("systemd notify socket %s (%s)", address, watchdog)
        return cls(address, watchdog_s)

    def send(self, *fields: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:  # systemd gone or restarting: nothing to do but say so
            logger.warning("systemd notify (%s) failed: %s", ", ".join(fields), exc)

    def tick(self, pool: Pool) -> None:
        """Called on the event loop every 0.1 s: READY and STATUS on change, WATCHDOG when due."""
        if self.sock is None:
            return
        health = pool.health()
        workers = health["workers"]
        status = f"{workers['ready']}/{workers['total']} workers ready, {workers['busy']} busy, {health['queue']} queued"
        fields = []
        if workers["ready"] and not self.ready:
            self.ready = True
            fields.append("READY=1")
        if status != self.status:
            self.status = status
            fields.append(f"STATUS={status}" if self.ready else f"STATUS=loading the model: {status}")
        if fields:
            self.send(*fields)
        if self.watchdog_s:
            self.watchdog(pool.heartbeat, self.watchdog_s / 2)

    def watchdog(self, heartbeat: float, every: float) -> None:
        """Pings if one is due and the supervisor's heartbeat is fresh."""
        now = time.monotonic()
        if now - self.last_ping < every:
            return
        age = now - heartbeat
        if age > max(every, MIN_STALE_S):
            if not self.withholding:
                logger.error("The pool supervisor last ticked %.1f s ago; withholding the systemd watchdog ping", age)
            self.withholding = True
            return
        self.withholding = False
        self.last_ping = now
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: ending streams, reaping workers")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()

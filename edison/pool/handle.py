"""The parent's handle on one worker: its process, its two one-way pipes, its reader thread,
and the per-worker record the pool keeps (state, which request runs in which slot).

Mirrors `multiprocessing.Process` (start, terminate, kill, join, pid, exitcode). The pool
owns the decisions; this class owns the plumbing, where each of these was a real bug
somewhere (gunicorn, pebble, billiard, loky, uvicorn):
- the parent closes the child's pipe ends right after start(), or EOF never arrives;
- pipe reads happen on a thread, never on the event loop (a half-written message would
  freeze it), and any read error at all means one thing: the worker is lost.
"""

from __future__ import annotations

import asyncio
import enum
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edison.worker.main import main as worker_main  # a spawn target only: it loads llama_cpp in the child

if TYPE_CHECKING:
    from edison.pool.request import Request


class WorkerState(enum.Enum):
    STARTING = "starting"  # alive, model not loaded yet
    READY = "ready"  # model loaded: takes jobs into its free slots
    KILLING = "killing"  # missed a deadline or stalled; being terminated


class WorkerHandle:
    def __init__(self, index: int, slots: int, args: tuple[Any, ...]) -> None:
        self.index = index
        self.args = args  # for worker.main, after the pipes
        self.state = WorkerState.STARTING
        self.slots: list[Request | None] = [None] * slots  # which request runs in which sequence slot
        self.was_ready = False
        self.started_at = 0.0
        self.last_heard = 0.0  # time.monotonic() of its last message: the stall watchdog's clock
        self.packages: tuple[str, ...] = ()  # top-level packages the worker had loaded when ready
        self.threads: int | None = None  # as it last reported them: fewer while other workers compute
        self.process: multiprocessing.process.BaseProcess | None = None

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[WorkerHandle, object], None],
        on_lost: Callable[[WorkerHandle], None],
    ) -> None:
        """Call from the event-loop thread: the worker's death signal follows the spawning thread."""
        ctx = multiprocessing.get_context("spawn")
        jobs_out, self.jobs = ctx.Pipe(duplex=False)
        self.results, results_in = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=worker_main,
            args=(jobs_out, results_in, *self.args),
            name=f"edison-worker-{self.index}",
            daemon=True,
        )
        self.process.start()
        jobs_out.close()
        results_in.close()
        self.started_at = self.last_heard = time.monotonic()
        self.reader = threading.Thread(
            target=self._read, args=(loop, on_message, on_lost), name=f"edison-reader-{self.index}", daemon=True
        )
        self.reader.start()

    def _read(self, loop: asyncio.AbstractEventLoop, on_message: Callable, on_lost: Callable) -> None:
        try:
            while True:
                message = self.results.recv()
                loop.call_soon_threadsafe(on_message, self, message)
        except Exception:  # EOFError, OSError, an unpickling error: all mean the worker is lost
            pass
        try:
            loop.call_soon_threadsafe(on_lost, self)
        except RuntimeError:  # the loop is closed: the service is already gone
            pass

    # The record.

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.slots)

    def free_slot(self) -> int | None:
        """A slot to dispatch into, if the worker is ready and has one."""
        if self.state is not WorkerState.READY:
            return None
        return next((i for i, r in enumerate(self.slots) if r is None), None)

    def requests(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    # The process.

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode if self.process else None

    def is_alive(self) -> bool:
        return bool(self.process and self.process.is_alive())  # reaps a finished child

    def send(self, message: object) -> None:
        self.jobs.send(message)

    def close_jobs(self) -> None:
        """An idle worker reads EOF and exits 0: the gentle way to stop one."""
        self.jobs.close()

    def signal(self, signum: int) -> None:
        if self.pid is None:
            return
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:  # already gone
            pass

    def dump_stack(self) -> None:
        self.signal(signal.SIGUSR1)  # faulthandler in the worker writes every thread's stack to stderr

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def join(self, timeout: float | None = None) -> None:
        if self.process:
            self.process.join(timeout)

    def close(self) -> None:
        """Releases the pipes once the process is reaped and the reader has seen EOF."""
        self.reader.join(timeout=1.0)
        for conn in (self.jobs, self.results):
            conn.close()

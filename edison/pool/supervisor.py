"""The worker supervisor: spawn, kill, reap and replace workers, with back-off and a heartbeat.

gunicorn's arbiter vocabulary at uvicorn's size. Everything runs on the event loop. It decides
about processes only; what happens to the requests of a lost worker is the pool's business
(`on_lost`), told before the reap so a client never waits for one.
- `manage_workers` ticks every SUPERVISE_INTERVAL_S: starts due replacements, kills a busy
  worker that has said nothing for `stall_timeout_s`, and advances the `heartbeat` that the
  systemd watchdog needs fresh.
- Back-off: a worker that fails to start, or that crashes again within `crash_window_s` of
  its last crashes, is respawned after an exponentially growing delay, and given up on past
  `restart_budget` (a model that loads but crashes on every job must not spin).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import psutil

from edison.pool.handle import WorkerHandle, WorkerState
from edison.pool.observer import PoolObserver
from edison.protocol import EXIT_LOAD_FAILED
from edison.settings import PoolSettings

logger = logging.getLogger("edison")

SUPERVISE_INTERVAL_S = 0.25  # the supervisor's tick: respawn latency and heartbeat resolution
MAX_BACKOFF_S = 30.0


@dataclass
class Restarts:
    """One worker index's failure record, kept across the processes that fill it."""

    failed_starts: int = 0  # in a row, reset when a worker gets ready
    crashes: deque[float] = field(default_factory=deque)  # time.monotonic() of recent crashes
    given_up: bool = False
    respawn_at: float | None = None


class Supervisor:
    def __init__(
        self,
        settings: PoolSettings,
        worker_args: Callable[[int], tuple[Any, ...]],
        on_message: Callable[[WorkerHandle, object], None],
        on_lost: Callable[[WorkerHandle], None],
        on_capacity: Callable[[], None],
        observer: PoolObserver,
    ) -> None:
        self.settings = settings
        self.worker_args = worker_args
        self.on_message = on_message
        self.on_lost = on_lost
        self.on_capacity = on_capacity  # a worker can take jobs again, or none ever will
        self.observer = observer
        self.workers: list[WorkerHandle | None] = [None] * settings.workers
        self.restarts = [Restarts() for _ in range(settings.workers)]
        self.heartbeat = 0.0  # time.monotonic() of the last completed tick
        self.closing = False
        self.stall_supervisor_after_s = 0.0  # debug: hang the loop below (watchdog tests)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def live(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w is not None]

    def all_given_up(self) -> bool:
        return all(r.given_up for r in self.restarts)

    # The loop.

    async def run(self) -> None:
        """Ticks until closing. If a tick raises or hangs, the heartbeat goes stale and the
        watchdog pings stop, so systemd restarts the service instead of it limping on."""
        self.loop = asyncio.get_running_loop()
        for index in range(len(self.workers)):
            self.spawn_worker(index)
        stall_at = time.monotonic() + self.stall_supervisor_after_s
        try:
            while not self.closing:
                self.manage_workers()
                if self.stall_supervisor_after_s and self.heartbeat >= stall_at:
                    logger.warning("debug.stall_supervisor_after_s: the pool supervisor hangs now")
                    await asyncio.Event().wait()
                await asyncio.sleep(SUPERVISE_INTERVAL_S)
        except Exception:
            logger.exception("The pool supervisor failed; no more respawns, and the watchdog pings stop")

    def manage_workers(self) -> None:
        now = time.monotonic()
        for index, record in enumerate(self.restarts):
            if record.respawn_at is not None and record.respawn_at <= now:
                record.respawn_at = None
                self.spawn_worker(index)
                self.observer.respawned()
        for worker in self.live():
            silent = now - worker.last_heard
            if worker.state is WorkerState.READY and worker.busy and silent > self.settings.stall_timeout_s:
                logger.warning(
                    "Worker %d (pid %s) sent nothing for %.1f s while busy (requests %s); killing it",
                    worker.index, worker.pid, silent, ", ".join(r.request_id for r in worker.requests()),
                )
                self.kill_worker(worker, "stalled", lambda w=worker: time.monotonic() - w.last_heard > 1.0)
        self.heartbeat = now

    # Transitions.

    def spawn_worker(self, index: int) -> None:
        if self.closing:
            return
        assert self.loop is not None
        worker = WorkerHandle(index, self.settings.slots, self.worker_args(index))
        worker.start(self.loop, self.on_message, self._on_eof)
        self.workers[index] = worker
        logger.info("Spawned worker %d (pid %s)", index, worker.pid)

    def worker_ready(self, worker: WorkerHandle) -> None:
        worker.state, worker.was_ready = WorkerState.READY, True
        self.restarts[worker.index].failed_starts = 0

    def kill_worker(self, worker: WorkerHandle, reason: str, still_due: Callable[[], bool], dump: bool = True) -> None:
        if worker.state is WorkerState.KILLING:
            return
        worker.state = WorkerState.KILLING  # never dispatched to again
        self._spawn_task(self._kill(worker, reason, still_due, dump))

    async def _kill(self, worker: WorkerHandle, reason: str, still_due: Callable[[], bool], dump: bool) -> None:
        """Stack dump, then SIGKILL (a worker ignores SIGTERM, and a stopped or wedged one could not
        act on it anyway). Its reader then sees EOF and `_on_eof` takes over. No dump (and no 50 ms
        wait for it) when the stack tells nothing: a load that nobody wants any more."""
        stopped = _is_stopped(worker.pid)
        if not stopped and dump:
            worker.dump_stack()
            await asyncio.sleep(0.05)  # let faulthandler finish writing
            if not still_due():  # its acknowledgement came after all: keep the worker
                logger.warning("Worker %d (pid %s) answered late; not killing it", worker.index, worker.pid)
                worker.state = WorkerState.READY
                self.on_capacity()
                return
        worker.kill()
        self.observer.killed(reason)
        logger.warning(
            "Killed worker %d (pid %s): %s%s", worker.index, worker.pid, reason,
            " while stopped (SIGSTOP)" if stopped else "",
        )

    def _on_eof(self, worker: WorkerHandle) -> None:
        """The worker's pipe hit EOF: its requests are settled at once, then it is reaped and replaced."""
        if self.closing or self.workers[worker.index] is not worker:
            return  # stop() reaps its own workers
        self.workers[worker.index] = None  # never dispatch to it again; the index refills after the reap
        self.on_lost(worker)
        self._spawn_task(self._reap_and_replace(worker, killed=worker.state is WorkerState.KILLING))

    async def _reap_and_replace(self, worker: WorkerHandle, killed: bool) -> None:
        await asyncio.to_thread(worker.join, 5)
        if worker.is_alive():
            worker.kill()
            await asyncio.to_thread(worker.join, 5)
        worker.close()
        if self.closing:
            return
        index, code = worker.index, worker.exitcode
        if not killed:
            logger.error("Worker %d (pid %s) exited with code %s", index, worker.pid, code)
            self.observer.crashed()
        delay = self._backoff(worker, killed)
        if delay is None:
            self.on_capacity()
            return
        logger.info("Respawning worker %d in %.1f s (old pid %s, exit code %s)", index, delay, worker.pid, code)
        self.restarts[index].respawn_at = time.monotonic() + delay  # the next due tick starts it

    def _backoff(self, worker: WorkerHandle, killed: bool) -> float | None:
        """The delay before the replacement, or None to give up on this index."""
        record, budget = self.restarts[worker.index], self.settings.restart_budget
        if not worker.was_ready or worker.exitcode == EXIT_LOAD_FAILED:
            record.failed_starts += 1
            failures, what = record.failed_starts, f"failed to start {record.failed_starts} times in a row"
        elif not killed:
            now = time.monotonic()
            record.crashes.append(now)
            while record.crashes and record.crashes[0] < now - self.settings.crash_window_s:
                record.crashes.popleft()
            failures = len(record.crashes) - 1  # the first crash in a while is replaced at once
            what = f"crashed {len(record.crashes)} times within {self.settings.crash_window_s:g} s"
        else:
            return 0.0  # a kill of ours is no crash: replace at once
        if failures > budget:
            logger.error("Worker %d %s; giving up on it", worker.index, what)
            record.given_up = True
            return None
        return 0.0 if failures == 0 else min(MAX_BACKOFF_S, self.settings.restart_backoff_s * 2 ** (failures - 1))

    # Shutdown.

    async def stop(self) -> None:
        """Every worker ends: told by EOF on its job pipe, then killed if it lingers; all reaped."""
        self.closing = True
        workers = self.live()
        for worker in workers:
            worker.close_jobs()
        deadline = time.monotonic() + self.settings.cancel_deadline_s + self.settings.kill_grace_s
        while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for worker in workers:
            if worker.is_alive():
                logger.warning("Worker %d (pid %s) did not exit; killing it", worker.index, worker.pid)
                worker.kill()
            await asyncio.to_thread(worker.join, 5)
            worker.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)  # reaps in flight finish, respawn nothing
        self.workers = [None] * len(self.workers)

    def _spawn_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _is_stopped(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False

"""The pool: N worker processes, a bounded FIFO queue, and the three-tier cancel.

Runs entirely on the event loop (messages from workers arrive through `call_soon_threadsafe`),
so its bookkeeping needs no locks. Cancel flags live in a lock-free `RawArray`, one slot per
worker, written only here: `cancel_upto[slot] = job_id` cancels that job and any older one,
and never a newer one, so a late cancel cannot stop the next job on the same worker.
`supervise` ticks (starting due replacements) and advances the `heartbeat` that the systemd
watchdog needs fresh; transitions are reported to a `PoolObserver` (the metrics).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Union

import psutil

from edison.messages import Cancelled, Done, Failed, Job, Progress, Ready, Sampling, Token, Usage
from edison.metrics import PoolObserver
from edison.process import WorkerProcess, WorkerState
from edison.settings import Settings
from edison.worker import EXIT_LOAD_FAILED

logger = logging.getLogger("edison")

SUPERVISE_INTERVAL_S = 0.25  # the supervisor's tick: respawn latency and heartbeat resolution


class Unavailable(Exception):
    """The pool cannot take a job now (answered 503)."""


class QueueFull(Unavailable):
    pass


class ShuttingDown(Unavailable):
    pass


class NoWorkers(Unavailable):
    pass


# What a request's consumer reads from `Request.events`, besides Progress and Token.


@dataclass(frozen=True)
class Queued:
    position: int  # 1 = next to run


@dataclass(frozen=True)
class Stopped:
    text: str
    tier: str  # queued, token, chunk, native, kill, completed
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class Failure:
    error: str


Event = Union[Queued, Progress, Token, Done, Stopped, Failure]
FINAL = (Done, Stopped, Failure)


@dataclass(eq=False)
class Request:
    job: Job
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    worker: WorkerProcess | None = None
    parts: list[str] = field(default_factory=list)  # text streamed so far
    cancel_at: float | None = None  # time.monotonic() of the first cancel
    submitted_at: float = field(default_factory=time.monotonic)
    dispatched_at: float | None = None
    first_token_at: float | None = None
    deadline: asyncio.TimerHandle | None = None
    finished: bool = False

    @property
    def request_id(self) -> str:
        return self.job.request_id


class Pool:
    def __init__(self, settings: Settings, model_path: str, metrics: PoolObserver | None = None) -> None:
        self.settings = settings
        self.model_path = model_path
        self.size = settings.pool.workers
        # Lock-free on purpose: a worker SIGKILLed while holding a lock would deadlock us.
        self.cancel_upto: Any = multiprocessing.get_context("spawn").RawArray("q", self.size)
        self.workers: list[WorkerProcess | None] = [None] * self.size
        self.failures = [0] * self.size  # consecutive failed starts per slot
        self.given_up: set[int] = set()  # slots past their restart budget
        self.queue: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.job_ids = itertools.count(1)
        self.closing = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.respawn_at: dict[int, float] = {}  # slot -> when its replacement is due
        self.heartbeat = 0.0  # time.monotonic() of the supervisor's last completed tick
        self.supervisor: asyncio.Task[None] | None = None
        self.metrics = metrics or PoolObserver()
        self.metrics.watch(self)

    # Lifecycle.

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        for slot in range(self.size):
            self.spawn_worker(slot)
        self.heartbeat = time.monotonic()
        self.supervisor = asyncio.ensure_future(self.supervise())

    async def supervise(self) -> None:
        """Ticks until stop(). If a tick raises or hangs, the heartbeat goes stale and the
        watchdog pings stop, so systemd restarts the service instead of it limping on."""
        stall_after = self.settings.debug.stall_supervisor_after_s
        stall_at = self.heartbeat + stall_after
        try:
            while not self.closing:
                self.manage_workers()
                if stall_after and self.heartbeat >= stall_at:
                    logger.warning("debug.stall_supervisor_after_s: the pool supervisor hangs now")
                    await asyncio.Event().wait()
                await asyncio.sleep(SUPERVISE_INTERVAL_S)
        except Exception:
            logger.exception("The pool supervisor failed; no more respawns, and the watchdog pings stop")

    def manage_workers(self) -> None:
        """Starts the replacements that are due, then records the heartbeat."""
        now = time.monotonic()
        for slot, due in list(self.respawn_at.items()):
            if due <= now:
                del self.respawn_at[slot]
                self.spawn_worker(slot)
                self.metrics.respawned()
        self.heartbeat = now

    def spawn_worker(self, slot: int) -> None:
        if self.closing:
            return
        assert self.loop is not None
        args = (self.cancel_upto, slot, self.settings, self.model_path, os.getpid())
        worker = WorkerProcess(slot, args)
        worker.start(self.loop, self._on_message, self._on_lost)
        self.workers[slot] = worker
        logger.info("Spawned worker %d (pid %s)", slot, worker.pid)

    async def stop(self) -> None:
        """Ends every request, then every worker: gently, then by force. Leaves nothing behind."""
        self.end_all("server shutting down")
        if self.supervisor is not None:
            self.supervisor.cancel()
        workers = [w for w in self.workers if w is not None]
        for worker in workers:
            worker.close_jobs()
        deadline = time.monotonic() + self.settings.pool.cancel_deadline_s + 1.0
        while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for worker in workers:
            if worker.is_alive():
                logger.warning("Worker %d (pid %s) did not exit; killing it", worker.slot, worker.pid)
                worker.kill()
            await asyncio.to_thread(worker.join, 5)
            worker.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)  # reaps in flight finish, respawn nothing
        self.workers = [None] * self.size

    def end_all(self, reason: str) -> None:
        """Shutdown: every open request gets its final event now; running jobs are told to stop."""
        self.closing = True
        for request in list(self.requests.values()):
            if request.worker is not None:
                self.cancel_upto[request.worker.slot] = request.job.job_id
            self._finish(request, Failure(reason))
        self.queue.clear()

    # Requests.

    def submit(
        self,
        sampling: Sampling,
        request_id: str,
        messages: tuple[dict[str, str], ...] | None = None,
        prompt: str | None = None,
        wedge_s: float = 0.0,
    ) -> Request:
        if self.closing:
            self.metrics.rejected("shutting_down")
            raise ShuttingDown("server shutting down")
        if len(self.given_up) == self.size:
            self.metrics.rejected("no_workers")
            raise NoWorkers("no model worker could be started; see the server log")
        job = Job(next(self.job_ids), request_id, sampling, messages, prompt, wedge_s)
        request = Request(job)
        worker = next((w for w in self.workers if w and w.state is WorkerState.IDLE), None)
        if worker is not None:
            self.requests[request_id] = request
            self._dispatch(worker, request)
        elif len(self.queue) < self.settings.pool.queue_size:
            self.requests[request_id] = request
            self.queue.append(request)
            request.events.put_nowait(Queued(len(self.queue)))
        else:
            self.metrics.rejected("queue_full")
            raise QueueFull(f"all {self.size} workers are busy and the queue is full ({len(self.queue)} waiting)")
        return request

    def cancel(self, request_id: str) -> bool:
        """True if the request was queued or running (also for a second cancel of it)."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        if request.cancel_at is not None:
            return True
        request.cancel_at = time.monotonic()
        if request.worker is None:
            self.queue.remove(request)
            self._finish(request, Stopped("", "queued"))
            self._announce_positions()
            return True
        worker = request.worker
        self.cancel_upto[worker.slot] = request.job.job_id
        assert self.loop is not None
        request.deadline = self.loop.call_later(self.settings.pool.cancel_deadline_s, self._on_deadline, request)
        return True

    def health(self, verbose: bool = False) -> dict[str, Any]:
        live = [w for w in self.workers if w is not None]
        ready = sum(w.state in (WorkerState.IDLE, WorkerState.BUSY) for w in live)
        report: dict[str, Any] = {
            "status": "ok" if ready else "unavailable",
            "workers": {
                "ready": ready,
                "busy": sum(w.state is WorkerState.BUSY for w in live),
                "total": self.size,
                "pids": [w.pid for w in live],
            },
            "queue": len(self.queue),
            "active_requests": len(self.requests),
        }
        if verbose:
            report["worker_details"] = [_describe(w) for w in live]
        return report

    # Transitions.

    def _dispatch(self, worker: WorkerProcess, request: Request) -> None:
        worker.state = WorkerState.BUSY
        worker.request = request
        request.worker, request.dispatched_at = worker, time.monotonic()
        logger.info("Request %s runs on worker %d (pid %s)", request.request_id, worker.slot, worker.pid)
        try:
            worker.send(request.job)
        except OSError:
            pass  # the worker is dying; its reader reports it lost, which fails the request

    def _dispatch_next(self, worker: WorkerProcess) -> None:
        if self.queue and not self.closing and worker.state is WorkerState.IDLE:  # never to one being killed
            self._dispatch(worker, self.queue.popleft())
            self._announce_positions()

    def _announce_positions(self) -> None:
        for position, request in enumerate(self.queue, 1):
            request.events.put_nowait(Queued(position))

    def _finish(self, request: Request, event: Event) -> None:
        if request.finished:
            return
        request.finished = True
        if request.deadline:
            request.deadline.cancel()
        self.requests.pop(request.request_id, None)
        request.events.put_nowait(event)
        self.metrics.finished(request, event)

    def _on_message(self, worker: WorkerProcess, message: object) -> None:
        if isinstance(message, Ready):
            worker.state, worker.was_ready = WorkerState.IDLE, True
            self.failures[worker.slot] = 0
            logger.info("Worker %d (pid %s) ready: %s, n_ctx %d", worker.slot, worker.pid, message.model, message.n_ctx)
            self._dispatch_next(worker)
            return
        request = worker.request
        if request is None or getattr(message, "job_id", None) != request.job.job_id:
            return  # stale: from a job that was already settled
        if isinstance(message, Token):
            request.parts.append(message.text)
            request.first_token_at = request.first_token_at or time.monotonic()
            if not request.finished:
                request.events.put_nowait(message)
        elif isinstance(message, Progress):
            if not request.finished:
                request.events.put_nowait(message)
        elif isinstance(message, (Done, Cancelled, Failed)):
            worker.request = None
            if worker.state is WorkerState.BUSY:
                worker.state = WorkerState.IDLE
            self._finish(request, self._final_event(request, message))
            self._dispatch_next(worker)

    def _final_event(self, request: Request, message: Done | Cancelled | Failed) -> Event:
        rid, pid = request.request_id, request.worker.pid if request.worker else None
        if isinstance(message, Failed):
            logger.error("Request %s failed in worker pid %s: %s\n%s", rid, pid, message.error, message.traceback)
            return Failure(message.error)
        if request.cancel_at is None:
            assert isinstance(message, Done)
            return message
        elapsed_ms = (time.monotonic() - request.cancel_at) * 1000
        tier = message.tier if isinstance(message, Cancelled) else "completed"
        logger.info("Request %s stopped by worker pid %s (%s) %.1f ms after the cancel", rid, pid, tier, elapsed_ms)
        return Stopped(message.text, tier, message.usage)

    def _on_deadline(self, request: Request) -> None:
        worker = request.worker
        if request.finished or worker is None or worker.request is not request:
            return
        logger.warning(
            "Worker %d (pid %s) missed the %.1f s cancel deadline for request %s; killing it",
            worker.slot, worker.pid, self.settings.pool.cancel_deadline_s, request.request_id,
        )
        self._spawn_task(self.kill_worker(worker))

    async def kill_worker(self, worker: WorkerProcess) -> None:
        """Stack dump, SIGTERM, grace, SIGKILL. Its reader then sees EOF and `_on_lost` takes over."""
        worker.state = WorkerState.KILLING
        stopped = _is_stopped(worker.pid)
        if not stopped:
            worker.dump_stack()
            await asyncio.sleep(0.05)  # let faulthandler finish writing
            if worker.request is None:  # its acknowledgement came after all: keep the worker
                logger.warning("Worker %d (pid %s) acknowledged the cancel late; not killing it", worker.slot, worker.pid)
                worker.state = WorkerState.IDLE
                self._dispatch_next(worker)
                return
            worker.terminate()
            deadline = time.monotonic() + self.settings.pool.kill_grace_s
            while worker.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        if worker.is_alive():  # a stopped (SIGSTOP) process ignores SIGTERM: always end in SIGKILL
            worker.kill()
        self.metrics.killed()
        logger.warning(
            "Killed worker %d (pid %s) for request %s: missed the cancel deadline%s",
            worker.slot, worker.pid, worker.request.request_id if worker.request else None,
            " while stopped (SIGSTOP)" if stopped else "",
        )

    def _on_lost(self, worker: WorkerProcess) -> None:
        """The worker's pipe hit EOF: fail its request at once, then reap it and replace it."""
        if self.closing or self.workers[worker.slot] is not worker:
            return  # stop() reaps its own workers
        self.workers[worker.slot] = None  # never dispatch to it again; the slot refills after the reap
        request = worker.request
        worker.request = None
        if request is not None and not request.finished:
            if request.cancel_at is not None:
                self._finish(request, Stopped("".join(request.parts), "kill"))
            else:
                logger.error("Worker %d (pid %s) died during request %s", worker.slot, worker.pid, request.request_id)
                self._finish(request, Failure(f"the model worker (pid {worker.pid}) died during generation"))
        self._spawn_task(self._reap_and_replace(worker, was_killing=worker.state is WorkerState.KILLING))

    async def _reap_and_replace(self, worker: WorkerProcess, was_killing: bool) -> None:
        await asyncio.to_thread(worker.join, 5)
        if worker.is_alive():
            worker.kill()
            await asyncio.to_thread(worker.join, 5)
        worker.close()
        slot, code = worker.slot, worker.exitcode
        if self.closing:
            return
        if not was_killing:
            logger.error("Worker %d (pid %s) exited with code %s", slot, worker.pid, code)
            self.metrics.crashed()
        delay = 0.0
        if not worker.was_ready or code == EXIT_LOAD_FAILED:
            self.failures[slot] += 1
            if self.failures[slot] > self.settings.pool.restart_budget:
                logger.error("Worker %d failed to start %d times in a row; giving up on it", slot, self.failures[slot])
                self.given_up.add(slot)
                self._fail_queue_if_no_workers()
                return
            delay = min(30.0, self.settings.pool.restart_backoff_s * 2 ** (self.failures[slot] - 1))
        logger.info("Respawning worker %d in %.1f s (old pid %s, exit code %s)", slot, delay, worker.pid, code)
        self.respawn_at[slot] = time.monotonic() + delay  # the supervisor's next due tick starts it

    def _fail_queue_if_no_workers(self) -> None:
        if len(self.given_up) < self.size:
            return
        for request in list(self.queue):
            self._finish(request, Failure("no model worker could be started; see the server log"))
        self.queue.clear()

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def _describe(worker: WorkerProcess) -> dict[str, Any]:
    try:
        rss = psutil.Process(worker.pid).memory_info().rss if worker.pid else None
    except psutil.Error:
        rss = None
    return {
        "slot": worker.slot,
        "pid": worker.pid,
        "state": worker.state.value,
        "request_id": worker.request.request_id if worker.request else None,
        "rss_bytes": rss,
        "uptime_s": round(time.monotonic() - worker.started_at, 1),
    }


def _is_stopped(pid: int | None) -> bool:
    try:
        return pid is not None and psutil.Process(pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False

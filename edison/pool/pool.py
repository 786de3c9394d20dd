"""The pool: requests in, events out. A bounded FIFO queue in front of every sequence slot of
every worker, the three-tier cancel, and resume after a worker is lost.

Runs entirely on the event loop (worker messages arrive through `call_soon_threadsafe`), so
its bookkeeping needs no locks. The processes themselves are the `Supervisor`'s; the cancel
flags are `CancelFlags`; a request's state is one `Request` record.
- A request runs in one slot of one worker; the queue is used only when every slot is busy.
- Cancel: the slot's flag (tiers 1 and 2, in the worker), and a deadline after which the
  supervisor kills the worker (tier 3).
- A worker lost while running requests that were not cancelled (crash, kill, stall) has them
  re-queued at the front with the text streamed so far: resumed once, never twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import time
from collections import deque
from typing import Any

import psutil

from edison.kvstore import KVStore
from edison.pool.cpu import CpuShare
from edison.pool.flags import CancelFlags
from edison.pool.handle import WorkerHandle, WorkerState
from edison.pool.observer import PoolObserver
from edison.pool.request import Completed, Event, Failure, Loading, Queued, Request, Stopped
from edison.pool.supervisor import Supervisor
from edison.protocol import (
    Cancelled, Done, Failed, FailureKind, Format, Job, Progress, Ready, Resume, Threads, Tier, Token,
)
from edison.settings import Sampling, Settings

logger = logging.getLogger("edison")


class Unavailable(Exception):
    """The pool cannot take a job now (answered 503)."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Pool:
    """One model's workers. `Models` (models.py) keeps one per loaded model."""

    def __init__(
        self,
        settings: Settings,
        model_path: str,
        observer: PoolObserver | None = None,
        name: str = "",
        cpu: CpuShare | None = None,
    ) -> None:
        self.settings = settings
        self.model_path = model_path
        self.name = name or os.path.basename(model_path)
        self.slots = settings.pool.slots
        self.flags = CancelFlags(settings.pool.workers, self.slots)
        self.cpu = cpu or CpuShare()  # one for every model's pool: see cpu.py
        self.queue: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.job_ids = itertools.count(1)
        self.closing = False
        self.prompt_format = ""  # as the first ready worker reports it
        self.kv_store = KVStore.open(settings, model_path)  # to report the saved states' tiers
        if self.kv_store is not None:
            self.kv_store.sweep_older_formats()  # once per model load, not at every worker spawn
        self.observer = observer or PoolObserver()
        self.supervisor = Supervisor(
            settings.pool, self._worker_args, self._on_message, self._on_lost, self._fill_slots, self.observer
        )
        self.supervisor.stall_supervisor_after_s = settings.debug.stall_supervisor_after_s
        self.task: asyncio.Task[None] | None = None
        self.started_at: float | None = None  # time.monotonic() of start(): the load's clock
        self.load_time_s: float | None = None  # start() -> the first worker ready

    @property
    def heartbeat(self) -> float:
        return self.supervisor.heartbeat

    def _worker_args(self, index: int) -> tuple[Any, ...]:
        return (self.flags.array, self.cpu.value, index, self.settings, self.model_path, os.getpid())

    # Lifecycle.

    @property
    def ready(self) -> bool:
        return any(w.state is WorkerState.READY for w in self.supervisor.live())

    async def start(self) -> None:
        self.started_at = self.supervisor.heartbeat = time.monotonic()
        self.task = asyncio.ensure_future(self.supervisor.run())
        await asyncio.sleep(0)  # the first workers are spawned from this (the event loop's) thread

    async def stop(self) -> None:
        """Ends every request, then every worker: gently, then by force. Leaves nothing behind."""
        self.end_all("server shutting down")
        await self.supervisor.stop()
        self.cpu.set(self, 0)
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def end_all(self, reason: str) -> None:
        """Shutdown: every open request gets its final event now; running jobs are told to stop."""
        self.closing = self.supervisor.closing = True
        for request in list(self.requests.values()):
            if request.worker is not None and request.slot is not None:
                self.flags.cancel(request.worker.index, request.slot, request.job.job_id)
            self._finish(request, Failure(FailureKind.SHUTTING_DOWN, reason))
        self.queue.clear()

    # Requests.

    def submit(
        self,
        sampling: Sampling,
        request_id: str,
        messages: tuple[dict[str, str], ...] | None = None,
        prompt: str | None = None,
        wedge_s: float = 0.0,
        format: Format | None = None,
    ) -> Request:
        if self.closing:
            raise self._refuse(FailureKind.SHUTTING_DOWN, "server shutting down")
        if self.supervisor.all_given_up():
            raise self._refuse(FailureKind.NO_WORKERS, "no model worker could be started; see the server log")
        request = Request(Job(next(self.job_ids), request_id, sampling, messages, prompt, wedge_s, format=format))
        place = self._free_slot()
        if place is None and len(self.queue) >= self.settings.pool.queue_size:
            raise self._refuse(
                FailureKind.QUEUE_FULL,
                f"all {self.capacity} slots are busy and the queue is full ({len(self.queue)} waiting)",
            )
        self.requests[request_id] = request
        if place is not None:
            self._dispatch(request, *place)
        else:
            self.queue.append(request)
            if self.ready:
                request.events.put_nowait(Queued(len(self.queue)))
            else:
                self.announce_loading([request])
        return request

    def announce_loading(self, requests: list[Request] | None = None) -> None:
        """While no worker has the model loaded yet, its waiting requests hear so."""
        elapsed = time.monotonic() - self.started_at if self.started_at is not None else 0.0
        for request in self.queue if requests is None else requests:
            if not request.resumed:
                request.events.put_nowait(Loading(self.name, round(elapsed, 1)))

    def abandon_load(self) -> None:
        """Nobody wants this model any more while it loads: its loading workers are SIGKILLed at
        once, as a wedged one would be (a load is one long native call that no flag reaches)."""
        for worker in self.supervisor.live():
            if worker.state is WorkerState.STARTING:
                self.supervisor.kill_worker(worker, "its model load was abandoned", lambda: True, dump=False)

    def _refuse(self, kind: FailureKind, message: str) -> Unavailable:
        self.observer.rejected(kind.value)
        return Unavailable(kind, message)

    @property
    def capacity(self) -> int:
        return self.settings.pool.workers * self.slots

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
            self._finish(request, Stopped(request.text, Tier.QUEUED, request.usage))
            self._announce_positions()
            return True
        assert request.slot is not None
        self.flags.cancel(request.worker.index, request.slot, request.job.job_id)
        loop = asyncio.get_running_loop()
        request.deadline = loop.call_later(self.settings.pool.cancel_deadline_s, self._on_deadline, request)
        return True

    # Dispatch.

    def _free_slot(self) -> tuple[WorkerHandle, int] | None:
        """The least busy ready worker's free slot: spreads chats over workers before batching them."""
        candidates = [(w.busy, w.index, w) for w in self.supervisor.live() if w.free_slot() is not None]
        if not candidates or self.closing:
            return None
        worker = min(candidates, key=lambda c: c[:2])[2]
        slot = worker.free_slot()
        assert slot is not None
        return worker, slot

    def _dispatch(self, request: Request, worker: WorkerHandle, slot: int) -> None:
        if not worker.busy:  # the stall clock starts when the worker gets work, not at its last word
            worker.last_heard = time.monotonic()
        worker.slots[slot] = request
        self._count_busy()
        request.worker, request.slot = worker, slot
        request.dispatched_at = request.dispatched_at or time.monotonic()
        job = dataclasses.replace(request.job, slot=slot)
        request.job = job
        logger.info("Request %s runs on worker %d slot %d (pid %s)", request.request_id, worker.index, slot, worker.pid)
        try:
            worker.send(job)
        except OSError:
            pass  # the worker is dying; its reader reports it lost, which settles the request

    def _fill_slots(self) -> None:
        """Capacity changed: queued requests move into free slots, or fail if no worker ever will."""
        while self.queue and (place := self._free_slot()) is not None:
            self._dispatch(self.queue.popleft(), *place)
            self._announce_positions()
        if self.queue and self.supervisor.all_given_up():
            for request in list(self.queue):
                self._finish(request, Failure(FailureKind.NO_WORKERS, "no model worker could be started; see the server log"))
            self.queue.clear()

    def _announce_positions(self) -> None:
        if not self.ready:
            return  # still loading: its requests hear that instead (announce_loading)
        for position, request in enumerate(self.queue, 1):
            if not request.resumed:  # a resumed stream shows a pause, nothing else
                request.events.put_nowait(Queued(position))

    def _finish(self, request: Request, event: Event) -> None:
        if request.finished:
            return
        request.finished = True
        if request.deadline:
            request.deadline.cancel()
        self.requests.pop(request.request_id, None)
        request.events.put_nowait(event)
        self.observer.finished(request, event)

    def _release(self, request: Request) -> None:
        worker, slot = request.worker, request.slot
        if worker is not None and slot is not None and worker.slots[slot] is request:
            worker.slots[slot] = None
            self._count_busy()

    def _count_busy(self) -> None:
        self.cpu.set(self, sum(bool(w.busy) for w in self.supervisor.live()))

    # Worker messages.

    def _on_message(self, worker: WorkerHandle, message: object) -> None:
        worker.last_heard = time.monotonic()
        if isinstance(message, Ready):
            if self.load_time_s is None and self.started_at is not None:
                self.load_time_s = time.monotonic() - self.started_at
            self.supervisor.worker_ready(worker)
            worker.packages = message.packages
            worker.threads = self.settings.threads
            self.prompt_format = message.prompt_format
            logger.info("Worker %d (pid %s) ready: %s, n_ctx %d, %d slots, prompt format: %s",
                        worker.index, worker.pid, message.model, message.n_ctx, message.slots, message.prompt_format)
            self._fill_slots()
            return
        if isinstance(message, Threads):
            worker.threads = message.threads
            return
        job_id = getattr(message, "job_id", None)
        request = next((r for r in worker.requests() if r.job.job_id == job_id), None)
        if request is None:
            return  # stale: from a job that was already settled
        if isinstance(message, Token):
            request.parts.append(message.text)
            request.completion_tokens += message.tokens
            request.first_token_at = request.first_token_at or time.monotonic()
            if not request.finished and message.text:
                request.events.put_nowait(message)
        elif isinstance(message, Progress):
            if not request.finished and not request.resumed:
                request.events.put_nowait(message)
        elif isinstance(message, (Done, Cancelled, Failed)):
            self._release(request)
            if not request.finished:  # (a shutdown already answered it)
                self._finish(request, self._final_event(request, message))
            if worker.state is WorkerState.READY:
                self._fill_slots()

    def _final_event(self, request: Request, message: Done | Cancelled | Failed) -> Event:
        rid, pid = request.request_id, request.worker.pid if request.worker else None
        if isinstance(message, Failed):
            logger.error("Request %s failed in worker pid %s: %s\n%s", rid, pid, message.error, message.traceback)
            return Failure(message.kind, message.error)
        request.prompt_tokens = message.usage.prompt_tokens
        request.cached_tokens = message.usage.cached_tokens
        request.cached_from = message.usage.cached_from
        # The worker's own count (stop-string tokens included) plus what a lost worker had made.
        request.completion_tokens = request.kept_tokens + message.usage.completion_tokens
        if request.cancel_at is None:
            assert isinstance(message, Done)
            return Completed(request.text, message.finish_reason, request.usage)
        elapsed_ms = (time.monotonic() - request.cancel_at) * 1000
        tier = message.tier if isinstance(message, Cancelled) else Tier.COMPLETED
        logger.info("Request %s stopped by worker pid %s (%s) %.1f ms after the cancel", rid, pid, tier.value, elapsed_ms)
        return Stopped(request.text, tier, request.usage)

    def _on_deadline(self, request: Request) -> None:
        worker = request.worker
        if request.finished or worker is None or request not in worker.slots:
            return
        logger.warning(
            "Worker %d (pid %s) missed the %.1f s cancel deadline for request %s; killing it",
            worker.index, worker.pid, self.settings.pool.cancel_deadline_s, request.request_id,
        )
        self.supervisor.kill_worker(
            worker, f"missed the cancel deadline for request {request.request_id}", lambda: not request.finished
        )

    def _on_lost(self, worker: WorkerHandle) -> None:
        """The worker is gone: each of its requests is stopped (if cancelled), resumed, or failed."""
        for request in worker.requests():
            self._release(request)
            if request.finished:
                continue
            if request.cancel_at is not None:
                self._finish(request, Stopped(request.text, Tier.KILL, request.usage))
            elif request.resumed or self.closing:
                logger.error("Worker %d (pid %s) died during request %s", worker.index, worker.pid, request.request_id)
                self._finish(request, Failure(FailureKind.WORKER_DIED, f"the model worker (pid {worker.pid}) died during generation"))
            else:
                self._resume(request, worker)
        self._fill_slots()

    def _resume(self, request: Request, lost: WorkerHandle) -> None:
        request.resumed += 1
        request.kept_tokens = request.completion_tokens
        request.worker = request.slot = None
        request.job = dataclasses.replace(
            request.job, job_id=next(self.job_ids), resume=Resume(request.text, request.completion_tokens), wedge_s=0.0
        )
        logger.warning(
            "Resuming request %s after worker %d (pid %s) was lost: %d tokens kept",
            request.request_id, lost.index, lost.pid, request.completion_tokens,
        )
        self.observer.resumed()
        self.queue.appendleft(request)

    # Reports.

    def health(self, verbose: bool = False) -> dict[str, Any]:
        live = self.supervisor.live()
        ready = [w for w in live if w.state is WorkerState.READY]
        report: dict[str, Any] = {
            "status": "ok" if ready else "unavailable",
            "workers": {
                "ready": len(ready),
                "busy": sum(bool(w.busy) for w in live),
                "total": len(self.supervisor.workers),
                "given_up": sum(r.given_up for r in self.supervisor.restarts),
                "pids": [w.pid for w in live],
            },
            "slots": {
                "per_worker": self.slots,
                "ready": len(ready) * self.slots,
                "busy": sum(w.busy for w in live),
                "total": self.capacity,
            },
            "queue": len(self.queue),
            "active_requests": len(self.requests),
            "model": {"file": os.path.basename(self.model_path), "prompt_format": self.prompt_format},
        }
        if verbose:
            report["kv_cache"] = self.kv_store.usage() if self.kv_store else {}
            report["worker_details"] = [_describe(w, self.supervisor.restarts[w.index]) for w in live]
        return report


def _describe(worker: WorkerHandle, restarts: Any) -> dict[str, Any]:
    try:
        rss = psutil.Process(worker.pid).memory_info().rss if worker.pid else None
    except psutil.Error:
        rss = None
    requests = [r.request_id if r else None for r in worker.slots]
    return {
        "index": worker.index,
        "pid": worker.pid,
        "state": worker.state.value,
        "busy_slots": worker.busy,
        "threads": worker.threads,  # its share of the cores now (cpu.py)
        "request_ids": requests,
        "request_id": next((r for r in requests if r), None),  # the first one: kept for older clients
        "recent_crashes": len(restarts.crashes),
        "rss_bytes": rss,
        "uptime_s": round(time.monotonic() - worker.started_at, 1),
        "packages": list(worker.packages),  # what the worker had imported when ready (layer check)
    }

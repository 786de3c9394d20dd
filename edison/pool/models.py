"""Several models on one box: one `Pool` per loaded model, loaded on demand, unloaded when idle.

The HTTP layer talks to `Models` as it talked to one pool (submit, cancel, health); a request
names its model, or gets the default one. Decisions, all on the event loop:
- Load: the first request for an unloaded model creates its pool and queues on it (it hears
  `Loading` every LOADING_EVERY_S) while its workers start. Room is made first: under
  `pool.max_loaded_models` / `pool.max_loaded_mib` the least recently used *idle* model is
  unloaded, and the load starts when its workers are gone. A model with requests in flight is
  never unloaded; when nothing can be, the request is refused with a 503 that says why.
- Unload: a worker per model makes it a process exit, so every byte goes back to the OS. A
  model idle for its `keep_alive_s` (or a request's `keep_alive`) is unloaded.
- Stop means stop, for loads too: a load is one long native call no flag reaches, so when the
  last request waiting for it is cancelled or disconnects, its workers are SIGKILLed, as the
  kill tier does to a wedged one. The default model, loaded at start-up, is the service's own
  and is not abandoned that way.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any

import psutil

from edison.gguf import NotGGUF, estimate_bytes
from edison.kvstore import KVStore
from edison.pool.cpu import CpuShare
from edison.pool.observer import PoolObserver
from edison.pool.pool import Pool, Unavailable
from edison.pool.request import Request
from edison.protocol import FailureKind, Format
from edison.settings import ModelEntry, Sampling, Settings

logger = logging.getLogger("edison")

TICK_S = 0.25  # keep-alive expiry and loading announcements
LOADING_EVERY_S = 0.5
MIB = 1 << 20


class UnknownModel(LookupError):
    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(f"unknown model {name!r}; available: {', '.join(available)}")
        self.available = available


class Busy(RuntimeError):
    """An unload asked of a model with requests in flight (answered 409)."""


class Models:
    def __init__(self, settings: Settings, paths: dict[str, str], observer: PoolObserver | None = None) -> None:
        self.settings = settings
        self.entries: dict[str, ModelEntry] = settings.entries()
        self.default = next(iter(self.entries))
        self.paths = paths  # name -> GGUF file, resolved at start-up
        self.observer = observer or PoolObserver()
        self.pools: dict[str, Pool] = {}  # loading or loaded
        self.cpu = CpuShare()  # the cores, shared by every model's busy workers
        self.unloading: dict[str, asyncio.Future[None]] = {}
        self.idle_since: dict[str, float] = {}
        self.last_used: dict[str, float] = {}  # a request came or was running: the LRU order
        self.keep_alive: dict[str, float] = {}  # a request's keep_alive, for the idle time after it
        self.load_times: dict[str, float] = {}  # the last load of each model: start -> first worker ready
        self.preloaded: Pool | None = None
        self.estimates = {name: _estimate(paths[name], entry) for name, entry in self.entries.items()}
        default_entry = self.entries[self.default]
        self.kv_store = KVStore.open(settings.for_model(default_entry), paths[self.default])  # for reports
        self.closing = False
        self.ticked = 0.0
        self.task: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Future[Any]] = set()
        self.observer.watch(self)

    # What the HTTP layer, the metrics and the notifier read, as they read one pool.

    @property
    def requests(self) -> collections.ChainMap[str, Request]:
        return collections.ChainMap(*(p.requests for p in self.pools.values()))

    @property
    def queue(self) -> list[Request]:
        return [r for p in self.pools.values() for r in p.queue]

    @property
    def heartbeat(self) -> float:
        """The stalest of every running supervisor's and this class's own tick."""
        return min([self.ticked, *(p.heartbeat for p in self.pools.values() if p.task is not None)])

    @property
    def model_path(self) -> str:
        return self.paths[self.default]

    @property
    def prompt_format(self) -> str:
        pool = self.pools.get(self.default)
        return pool.prompt_format if pool else ""

    def names(self) -> list[str]:
        return list(self.entries)

    # Lifecycle.

    async def start(self) -> None:
        self.ticked = time.monotonic()
        self.task = asyncio.ensure_future(self._tick())
        self.preloaded = self._load(self.default)  # `make run` answers its first request warm
        await asyncio.sleep(0)

    async def stop(self) -> None:
        self.end_all("server shutting down")
        if self.task is not None:
            self.task.cancel()
        pools = list(self.pools.values())
        self.pools.clear()
        await asyncio.gather(*(p.stop() for p in pools), *self.unloading.values(), *self.tasks, return_exceptions=True)

    def end_all(self, reason: str) -> None:
        self.closing = True
        for pool in self.pools.values():
            pool.end_all(reason)

    # Requests.

    def entry(self, name: str | None) -> ModelEntry:
        found = self.entries.get(name or self.default)
        if found is None:
            raise UnknownModel(str(name), self.names())
        return found

    def submit(
        self,
        sampling: Sampling,
        request_id: str,
        messages: tuple[dict[str, str], ...] | None = None,
        prompt: str | None = None,
        wedge_s: float = 0.0,
        format: Format | None = None,
        model: str | None = None,
        keep_alive: float | None = None,
    ) -> Request:
        name = self.entry(model).name
        if self.closing:
            raise Unavailable(FailureKind.SHUTTING_DOWN, "server shutting down")
        pool = self.pools.get(name) or self._load(name)
        request = pool.submit(sampling, request_id, messages=messages, prompt=prompt, wedge_s=wedge_s, format=format)
        self.idle_since.pop(name, None)
        self.last_used[name] = time.monotonic()
        if keep_alive is not None:
            self.keep_alive[name] = keep_alive
        return request

    def cancel(self, request_id: str) -> bool:
        pool = next((p for p in self.pools.values() if request_id in p.requests), None)
        if pool is None:
            return False
        found = pool.cancel(request_id)
        if not pool.ready and not pool.requests and pool is not self.preloaded:
            self._unload(pool.name, "its load was abandoned: no request waits for it any more", abandon=True)
        return found

    # Loading and unloading.

    def _load(self, name: str) -> Pool:
        """The model's pool, created now and started once the models unloaded for room are gone."""
        victims = self._make_room(name)
        entry = self.entries[name]
        pool = Pool(self.settings.for_model(entry), self.paths[name], self.observer, name, self.cpu)
        self.pools[name] = pool
        waits = [self.unloading[n] for n in (*victims, name) if n in self.unloading]
        logger.info("Loading model %s (%s)%s", name, os.path.basename(self.paths[name]),
                    f" after unloading {', '.join(victims)}" if victims else "")

        async def start() -> None:
            await asyncio.gather(*waits, return_exceptions=True)
            if self.pools.get(name) is pool and not self.closing:
                await pool.start()

        self._spawn(start())
        return pool

    def _make_room(self, name: str) -> list[str]:
        """Unloads least recently used idle models until `name` fits the limits; their names."""
        limits = self.settings.pool
        need = self.estimates[name]
        if limits.max_loaded_mib and need > limits.max_loaded_mib * MIB:
            raise Unavailable(FailureKind.MODELS_BUSY, f"model {name} needs about {need // MIB} MiB, more than "
                              f"pool.max_loaded_mib ({limits.max_loaded_mib})")
        victims: list[str] = []

        def over() -> bool:
            loaded = [n for n in self.pools if n not in victims]
            too_many = limits.max_loaded_models and len(loaded) + 1 > limits.max_loaded_models
            too_big = limits.max_loaded_mib and sum(self.estimates[n] for n in loaded) + need > limits.max_loaded_mib * MIB
            return bool(too_many or too_big)

        while over():
            idle = [n for n, p in self.pools.items() if n not in victims and not p.requests]
            if not idle:
                busy = ", ".join(n for n in self.pools if n not in victims)
                raise Unavailable(FailureKind.MODELS_BUSY, f"model {name} cannot be loaded now: the loaded models "
                                  f"({busy}) all have requests in flight and the limit is reached; try again shortly")
            victims.append(min(idle, key=lambda n: self.last_used.get(n, 0.0)))
        for victim in victims:
            self._unload(victim, f"to make room for {name}")
        return victims

    def _unload(self, name: str, reason: str, abandon: bool = False) -> asyncio.Future[None]:
        pool = self.pools.pop(name)
        self.idle_since.pop(name, None)
        self.keep_alive.pop(name, None)
        if pool.load_time_s is not None:
            self.load_times[name] = pool.load_time_s
        if pool is self.preloaded:
            self.preloaded = None
        logger.info("Unloading model %s: %s", name, reason)
        if abandon:
            pool.abandon_load()
        task = asyncio.ensure_future(pool.stop())
        self.unloading[name] = task
        task.add_done_callback(lambda _t: self.unloading.get(name) is task and self.unloading.pop(name))
        return task

    async def load(self, name: str, timeout: float = 600.0) -> dict[str, Any]:
        """`POST /models/load`: loaded and ready, or Unavailable with the reason."""
        name = self.entry(name).name
        pool = self.pools.get(name) or self._load(name)
        until = time.monotonic() + timeout
        while not pool.ready:
            if self.pools.get(name) is not pool:
                raise Unavailable(FailureKind.MODELS_BUSY, f"model {name} was unloaded while it loaded")
            if pool.task is not None and pool.supervisor.all_given_up():
                raise Unavailable(FailureKind.NO_WORKERS, f"model {name} could not be loaded; see the server log")
            if time.monotonic() > until:
                raise Unavailable(FailureKind.NO_WORKERS, f"model {name} did not load within {timeout:g} s")
            await asyncio.sleep(0.05)
        self.idle_since.setdefault(name, time.monotonic())
        return self.describe(name)

    async def unload(self, name: str) -> dict[str, Any]:
        """`POST /models/unload`: every worker of the model gone, or Busy."""
        name = self.entry(name).name
        pool = self.pools.get(name)
        if pool is not None:
            if pool.requests:
                raise Busy(f"model {name} has {len(pool.requests)} requests in flight; stop them or wait")
            await self._unload(name, "asked to (POST /models/unload)")
        elif name in self.unloading:
            await self.unloading[name]
        return self.describe(name)

    async def _tick(self) -> None:
        while not self.closing:
            now = self.ticked = time.monotonic()
            for name, pool in list(self.pools.items()):
                if pool.task is not None and pool.supervisor.all_given_up() and not pool.requests and pool is not self.preloaded:
                    # Its requests were answered with the reason; the next one tries a fresh load.
                    # (The default model loaded at start-up stays given up: /health says 503.)
                    self._unload(name, "none of its workers could load it (see above)")
                    continue
                if not pool.ready:
                    if pool.queue and now - getattr(pool, "announced", 0.0) >= LOADING_EVERY_S:
                        pool.announced = now  # type: ignore[attr-defined]
                        pool.announce_loading()
                    continue
                if pool.requests:
                    self.idle_since.pop(name, None)
                    self.last_used[name] = now
                    continue
                idle = now - self.idle_since.setdefault(name, now)
                keep = self.keep_alive.get(name, self.entries[name].keep_alive_s)
                if keep >= 0 and idle >= keep:
                    self._unload(name, f"idle for {idle:.1f} s (keep_alive {keep:g} s)")
            await asyncio.sleep(TICK_S)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # Reports.

    def state(self, name: str) -> str:
        pool = self.pools.get(name)
        if pool is None:
            return "unloading" if name in self.unloading else "unloaded"
        return "ready" if pool.ready else "loading"

    def describe(self, name: str) -> dict[str, Any]:
        entry, pool = self.entries[name], self.pools.get(name)
        workers = pool.supervisor.live() if pool else []
        state = self.state(name)
        return {
            "name": name,
            "file": os.path.basename(self.paths[name]),
            "default": name == self.default,
            "state": state,
            "loaded": state == "ready",
            "keep_alive_s": self.keep_alive.get(name, entry.keep_alive_s),
            "load_time_s": _rounded(pool.load_time_s if pool and pool.load_time_s is not None else self.load_times.get(name)),
            "requests": len(pool.requests) if pool else 0,
            "slots_busy": sum(w.busy for w in workers),
            "slots": entry.pool.workers * entry.pool.slots,
            "workers": [w.pid for w in workers],
            "rss_bytes": _rss([w.pid for w in workers]) if workers else 0,
            "estimate_mib": self.estimates[name] // MIB,
            "prompt_format": pool.prompt_format if pool else "",
        }

    def listing(self) -> dict[str, Any]:
        limits = self.settings.pool
        return {"default": self.default, "limit": {"models": limits.max_loaded_models, "mib": limits.max_loaded_mib},
                "models": [self.describe(n) for n in self.entries]}

    def health(self, verbose: bool = False) -> dict[str, Any]:
        """One pool's report, summed over the loaded models, with each model's own beside it."""
        reports = {name: pool.health(verbose) for name, pool in self.pools.items()}
        loaded = list(reports.values())

        def total(section: str, key: str) -> int:
            return sum(r[section][key] for r in loaded)

        default = reports.get(self.default)
        report: dict[str, Any] = {
            "status": "ok" if any(r["status"] == "ok" for r in loaded) or not loaded else "unavailable",
            "workers": {
                "ready": total("workers", "ready"),
                "busy": total("workers", "busy"),
                "total": total("workers", "total"),
                "given_up": total("workers", "given_up"),
                "pids": [pid for r in loaded for pid in r["workers"]["pids"]],
            },
            "slots": {
                "per_worker": self.entries[self.default].pool.slots,
                "ready": total("slots", "ready"),
                "busy": total("slots", "busy"),
                "total": total("slots", "total"),
            },
            "queue": sum(r["queue"] for r in loaded),
            "active_requests": sum(r["active_requests"] for r in loaded),
            "model": default["model"] if default else {"file": os.path.basename(self.model_path), "prompt_format": ""},
            "models": {name: self.describe(name) for name in self.entries},
        }
        if verbose:
            report["kv_cache"] = self.kv_store.usage() if self.kv_store else {}
            report["worker_details"] = [
                {**detail, "model": name} for name, r in reports.items() for detail in r["worker_details"]
            ]
        return report


def _estimate(path: str, entry: ModelEntry) -> int:
    try:
        return estimate_bytes(path, entry.model.n_ctx, entry.pool.slots, entry.pool.workers)
    except (OSError, NotGGUF) as exc:
        logger.warning("Cannot estimate the memory of model %s (%s): %s; counting its file size", entry.name, path, exc)
        try:
            return os.path.getsize(path)
        except OSError:
            return 0


def _rss(pids: list[int | None]) -> int:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss if pid else 0
        except psutil.Error:
            pass
    return total


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


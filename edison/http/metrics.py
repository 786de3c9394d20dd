"""`GET /metrics` in Prometheus text format, from the pool's transitions and its bookkeeping.

The pool calls its `PoolObserver` at a few transitions: a request refused, finished or
resumed, a worker killed, crashed or respawned. `Metrics` turns those into
Prometheus series in its own `CollectorRegistry` (never the global one: two apps in one
process, as in tests, must not share counters). Gauges are read from the pool at scrape time,
so they cannot drift from the pool's own bookkeeping. Everything runs on the event loop.
"""

from __future__ import annotations

import time
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response

from edison.pool import Completed, Event, Failure, Models, PoolObserver, Request, Stopped

OUTCOMES = ("ok", "stopped", "error", "rejected")
PHASES = ("queued", "prefill", "decode")
# queued: left the queue; token/chunk/native: the generation loop saw the flag; kill: tier 3;
# completed: the job ended on its own before the cancel reached it.
TIERS = ("queued", "token", "chunk", "native", "kill", "completed")
STOP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics(PoolObserver):
    def __init__(self) -> None:
        disable_created_metrics()  # no `*_created` twin of every series: this process owns the library
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("edison_requests", "Requests by outcome", ["outcome"], registry=r)
        self.cancel_latency = Histogram(
            "edison_cancel_latency_seconds", "Cancel to final event, by the phase the job was in at the cancel",
            ["phase"], buckets=STOP_BUCKETS, registry=r,
        )
        self.cancel_tier = Counter("edison_cancel_tier", "Which cancel tier ended a cancelled job", ["tier"], registry=r)
        self.kills = Counter("edison_worker_kills", "Workers killed: a missed cancel deadline, or a stall", registry=r)
        self.resumes = Counter("edison_resumed", "Requests resumed on another worker after theirs was lost", registry=r)
        self.crashes = Counter("edison_worker_crashes", "Workers that exited without being told to", registry=r)
        self.respawns = Counter("edison_worker_respawns", "Replacement workers started", registry=r)
        self.ttft = Histogram(
            "edison_time_to_first_token_seconds", "Submit to first streamed token, queue wait included",
            buckets=WAIT_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "edison_queue_wait_seconds", "Submit to dispatch on a worker", buckets=WAIT_BUCKETS, registry=r
        )
        self.tokens = Counter("edison_tokens_generated", "Completion tokens generated", registry=r)
        self.prompt_tokens = Counter("edison_prompt_tokens", "Prompt tokens of finished jobs", registry=r)
        self.prompt_tokens_cached = Counter(
            "edison_prompt_tokens_cached", "Prompt tokens of finished jobs kept in the KV cache, not read again", registry=r
        )
        self.kv_lookups = Counter(
            "edison_kv_cache_lookups", "Where a job's cached prompt prefix came from: slot, ram, disk, or miss",
            ["result"], registry=r,
        )
        self.rate = Histogram(
            "edison_decode_tokens_per_second", "Per request: completion tokens over first token to end",
            buckets=RATE_BUCKETS, registry=r,
        )
        for outcome in OUTCOMES:  # every series exists from the start, at zero
            self.requests.labels(outcome)
        for phase in PHASES:
            self.cancel_latency.labels(phase)
        for tier in TIERS:
            self.cancel_tier.labels(tier)

    def watch(self, pool: Models) -> None:  # type: ignore[override]
        health = pool.health
        r = self.registry
        Gauge("edison_queue_depth", "Requests waiting for a worker", registry=r).set_function(lambda: len(pool.queue))
        Gauge("edison_workers_busy", "Workers running a job", registry=r).set_function(
            lambda: health()["workers"]["busy"]
        )
        Gauge("edison_workers_ready", "Workers with the model loaded", registry=r).set_function(
            lambda: health()["workers"]["ready"]
        )
        Gauge("edison_workers_configured", "Worker processes of the default model", registry=r).set(
            pool.entry(None).pool.workers
        )
        if pool.kv_store is not None:  # the saved KV states' tiers, read from their directories at scrape time
            store = pool.kv_store
            used = Gauge("edison_kv_cache_bytes", "Bytes of saved KV states, by tier", ["tier"], registry=r)
            entries = Gauge("edison_kv_cache_entries", "Saved KV states, by tier", ["tier"], registry=r)
            budget = Gauge("edison_kv_cache_budget_bytes", "Each tier's budget", ["tier"], registry=r)
            for tier in store.tiers:
                used.labels(tier.name).set_function(lambda t=tier: t.used()[1])
                entries.labels(tier.name).set_function(lambda t=tier: t.used()[0])
                budget.labels(tier.name).set(tier.budget)
        Gauge("edison_workers_given_up", "Workers past their restart budget", registry=r).set_function(
            lambda: health()["workers"]["given_up"]
        )
        Gauge("edison_slots_busy", "Sequence slots running a request", registry=r).set_function(
            lambda: health()["slots"]["busy"]
        )
        Gauge("edison_slots_ready", "Sequence slots of ready workers", registry=r).set_function(
            lambda: health()["slots"]["ready"]
        )
        Gauge("edison_active_requests", "Requests queued or running", registry=r).set_function(
            lambda: len(pool.requests)
        )
        # Per model (label `model`), read from the models' own records at scrape time.
        per_model = {
            "edison_model_loaded": ("1 if the model is loaded and ready", lambda d: float(d["loaded"])),
            "edison_model_loading": ("1 while the model loads", lambda d: float(d["state"] == "loading")),
            "edison_model_load_seconds": ("Its last load: start to the first worker ready",
                                          lambda d: d["load_time_s"] or 0.0),
            "edison_model_slots_busy": ("Its sequence slots running a request", lambda d: d["slots_busy"]),
            "edison_model_requests": ("Its requests queued or running", lambda d: d["requests"]),
            "edison_model_resident_bytes": ("RSS of its worker processes", lambda d: d["rss_bytes"]),
            "edison_model_estimate_bytes": ("What loading it is estimated to take (GGUF + KV cache)",
                                            lambda d: d["estimate_mib"] * (1 << 20)),
        }
        for metric, (text, read) in per_model.items():
            gauge = Gauge(metric, text, ["model"], registry=r)
            for name in pool.names():
                gauge.labels(name).set_function(lambda n=name, f=read: f(pool.describe(n)))

    def rejected(self, reason: str) -> None:
        self.requests.labels("rejected").inc()

    def finished(self, request: Request, event: Event) -> None:
        now = time.monotonic()
        outcome = "ok" if isinstance(event, Completed) else "stopped" if isinstance(event, Stopped) else "error"
        self.requests.labels(outcome).inc()
        if request.dispatched_at is not None:
            self.queue_wait.observe(request.dispatched_at - request.submitted_at)
        if request.first_token_at is not None:
            self.ttft.observe(request.first_token_at - request.submitted_at)
        if request.cancel_at is not None and isinstance(event, Stopped):
            self.cancel_tier.labels(event.tier.value).inc()
            self.cancel_latency.labels(cancel_phase(request)).observe(now - request.cancel_at)
        if isinstance(event, Failure):
            generated = request.completion_tokens
        else:
            generated = event.usage.completion_tokens
            self.prompt_tokens.inc(event.usage.prompt_tokens)
            self.prompt_tokens_cached.inc(event.usage.cached_tokens)
            if event.usage.prompt_tokens:  # it reached a worker
                self.kv_lookups.labels(event.usage.cached_from or "miss").inc()
        self.tokens.inc(generated)
        if generated >= 2 and request.first_token_at is not None and now > request.first_token_at:
            self.rate.observe((generated - 1) / (now - request.first_token_at))

    def killed(self, reason: str) -> None:
        self.kills.inc()

    def resumed(self) -> None:
        self.resumes.inc()

    def crashed(self) -> None:
        self.crashes.inc()

    def respawned(self) -> None:
        self.respawns.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def cancel_phase(request: Request) -> str:
    """Where the job was when the first cancel came: still queued, in the prompt, or streaming."""
    assert request.cancel_at is not None
    if request.dispatched_at is None or request.dispatched_at > request.cancel_at:
        return "queued"
    if request.first_token_at is not None and request.first_token_at <= request.cancel_at:
        return "decode"
    return "prefill"


async def metrics_endpoint(request: HttpRequest) -> Response:
    observer = request.state.pool.observer
    if not isinstance(observer, Metrics):
        return JSONResponse({"error": "metrics are off"}, status_code=404)
    return Response(observer.render(), media_type=CONTENT_TYPE_LATEST)

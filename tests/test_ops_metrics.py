"""`GET /metrics` moves as the pool does: real requests that complete, stop, queue, get refused,
hit the kill tier or lose their worker, on a real service. Also the GPU code path on a CPU
box: a native call deaf to the abort callback (a CUDA kernel's behaviour, here the debug
wedge) is stopped by the prefill chunk check, without a kill."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import COUNTING, Service, Stream, chat, long_prompt

pytestmark = pytest.mark.timeout(180)

MakeService = Callable[..., Service]


class Samples(dict[tuple[str, frozenset], float]):
    def __repr__(self) -> str:  # a failed assertion shows the numbers it compared, not 200 samples
        return f"<{len(self)} samples>"


def scrape(svc: Service) -> Samples:
    response = httpx.get(f"{svc.url}/metrics", timeout=5)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return Samples(
        ((s.name, frozenset(s.labels.items())), s.value)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    )


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def wait_ready_workers(svc: Service, old_pid: int, workers: int = 1) -> None:
    deadline = time.monotonic() + 60
    while True:
        health = svc.health()
        if health["workers"]["ready"] == workers and old_pid not in health["workers"]["pids"]:
            svc.known_pids |= set(health["workers"]["pids"])
            return
        assert time.monotonic() < deadline, health
        time.sleep(0.1)


def test_metrics_count_completed_stopped_queued_and_rejected_requests(make_service: MakeService) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 1, "queue_size": 1}})
    before = scrape(svc)
    assert value(before, "edison_workers_ready") == 1 and value(before, "edison_workers_busy") == 0

    completed = chat(svc.url, "What is the capital of France?")[-1].data
    assert completed["ok"] is True
    running = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    running.wait_for("token", count=5)
    queued = Stream(svc.url, {"message": "Hello"})
    queued.wait_for("queued")
    refused = httpx.post(f"{svc.url}/chat/stream", json={"message": "one too many"}, timeout=10)
    assert refused.status_code == 503
    during = scrape(svc)
    assert value(during, "edison_workers_busy") == 1 and value(during, "edison_queue_depth") == 1
    assert value(during, "edison_active_requests") == 2
    svc.cancel(queued.request_id)
    assert queued.done.data["stopped"] is True
    svc.cancel(running.request_id)
    assert running.done.data["stopped"] is True
    after = scrape(svc)

    assert moved(before, after, "edison_requests_total", outcome="ok") == 1
    assert moved(before, after, "edison_requests_total", outcome="stopped") == 2
    assert moved(before, after, "edison_requests_total", outcome="rejected") == 1
    assert moved(before, after, "edison_requests_total", outcome="error") == 0
    # Mid-decode the flag is seen before the next token or, inside that token's llama_decode, by
    # the abort callback: either tier is a correct stop.
    decode_tiers = {tier: moved(before, after, "edison_cancel_tier_total", tier=tier) for tier in ("token", "native")}
    assert sum(decode_tiers.values()) == 1, decode_tiers
    assert moved(before, after, "edison_cancel_tier_total", tier="queued") == 1
    assert moved(before, after, "edison_cancel_latency_seconds_count", phase="decode") == 1
    assert moved(before, after, "edison_cancel_latency_seconds_count", phase="queued") == 1
    assert moved(before, after, "edison_cancel_latency_seconds_count", phase="prefill") == 0
    assert moved(before, after, "edison_cancel_latency_seconds_sum", phase="decode") < 3.0
    assert moved(before, after, "edison_time_to_first_token_seconds_count") == 2  # the queued one had none
    streamed = len([e for e in running.events if e.name == "token"])
    generated = moved(before, after, "edison_tokens_generated_total")
    assert generated >= completed["usage"]["completion_tokens"] + streamed
    assert moved(before, after, "edison_prompt_tokens_total") >= completed["usage"]["prompt_tokens"]
    assert moved(before, after, "edison_decode_tokens_per_second_count") == 2
    assert value(after, "edison_decode_tokens_per_second_sum") > 0
    assert value(after, "edison_workers_busy") == 0 and value(after, "edison_queue_depth") == 0
    assert value(after, "edison_active_requests") == 0
    assert moved(before, after, "edison_worker_kills_total") == 0


def test_chunk_tier_stops_a_prefill_whose_native_call_ignores_the_abort(make_service: MakeService) -> None:
    """What bounds a stop on a GPU: llama.cpp's abort callback is not honoured mid-kernel there.
    The debug wedge is such a native call (it never looks at the flag); the first prefill chunk
    check after it stops the job, well before the kill deadline, and the worker lives on."""
    svc = make_service({"pool": {"workers": 1, "prefill_chunk": 64, "cancel_deadline_s": 6.0}})
    pid = svc.worker_pids()[0]
    before = scrape(svc)
    stream = Stream(svc.url, {"message": long_prompt(1500), "debug_wedge_s": 2.0})
    assert svc.worker_for(stream.request_id) == pid
    cancelled_at = time.monotonic()
    assert svc.cancel(stream.request_id)["status"] == "cancelled"
    done = stream.done
    assert done.data["stopped"] is True and done.data["response"] == ""
    assert done.at - cancelled_at < 4.0  # the rest of the wedge, then one check: not the 6 s deadline
    after = scrape(svc)
    assert moved(before, after, "edison_cancel_tier_total", tier="chunk") == 1
    assert moved(before, after, "edison_cancel_latency_seconds_count", phase="prefill") == 1
    assert moved(before, after, "edison_worker_kills_total") == 0
    assert chat(svc.url, "What is the capital of France?")[-1].data["ok"] is True
    assert svc.worker_pids() == [pid]  # no kill, no respawn


def test_kill_tier_and_crash_are_counted_and_the_workers_respawn(make_service: MakeService) -> None:
    svc = make_service({"pool": {"workers": 1}})
    before = scrape(svc)

    # A stopped (SIGSTOP) worker acknowledges nothing: only the kill tier can end its job.
    frozen = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    frozen.wait_for("token", count=3)
    pid = svc.worker_for(frozen.request_id)
    os.kill(pid, signal.SIGSTOP)
    svc.cancel(frozen.request_id)
    assert frozen.done.data["stopped"] is True
    wait_ready_workers(svc, pid)
    middle = scrape(svc)
    assert moved(before, middle, "edison_worker_kills_total") == 1
    assert moved(before, middle, "edison_cancel_tier_total", tier="kill") == 1
    assert moved(before, middle, "edison_cancel_latency_seconds_count", phase="decode") == 1
    assert moved(before, middle, "edison_worker_respawns_total") == 1
    assert moved(before, middle, "edison_worker_crashes_total") == 0

    stream = Stream(svc.url, {"message": COUNTING, "mode": "count"})
    stream.wait_for("token", count=3)
    pid = svc.worker_for(stream.request_id)
    os.kill(pid, signal.SIGKILL)
    assert stream.done.data["ok"] is True  # resumed on the replacement
    wait_ready_workers(svc, pid)
    after = scrape(svc)
    assert moved(middle, after, "edison_worker_crashes_total") == 1
    assert moved(middle, after, "edison_resumed_total") == 1
    assert moved(middle, after, "edison_requests_total", outcome="ok") == 1
    assert moved(middle, after, "edison_worker_respawns_total") == 1
    assert moved(middle, after, "edison_worker_kills_total") == 0
    assert moved(middle, after, "edison_tokens_generated_total") == 64  # the whole budget, counted once

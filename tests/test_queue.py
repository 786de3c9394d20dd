"""The bounded FIFO queue: 503 when full; a queued request that is cancelled or abandoned
leaves at once and never reaches a worker."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.support import COUNTING, RawStream, Service, Stream

pytestmark = pytest.mark.timeout(120)


def test_full_queue_answers_503_and_cancelled_queued_request_leaves(make_service: Callable[..., Service]) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 1, "queue_size": 2}})
    running = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    running.wait_for("token")
    first = Stream(svc.url, {"message": "Hello"})
    assert first.wait_for("queued").data == {"position": 1}
    second = Stream(svc.url, {"message": "Hello again"})
    assert second.wait_for("queued").data == {"position": 2}

    refused = httpx.post(f"{svc.url}/chat/stream", json={"message": "one too many"})
    assert refused.status_code == 503
    assert "queue is full" in refused.json()["error"]

    cancelled_at = time.monotonic()
    assert svc.cancel(first.request_id)["status"] == "cancelled"
    done = first.done
    assert done.data == {"ok": False, "stopped": True, "response": "", "mode_used": "chat", "stopped_by": "queued",
                         "usage": {"prompt_tokens": 0, "completion_tokens": 0, "cached_tokens": 0,
                                                                    "cached_from": ""}}
    assert done.at - cancelled_at < 0.2  # in-process: no worker is involved
    assert second.wait_for("queued", count=2).data == {"position": 1}  # moved up
    health = svc.health(verbose=True)
    assert health["queue"] == 1 and health["active_requests"] == 2
    assert [w["request_id"] for w in health["worker_details"]] == [running.request_id]

    svc.cancel(running.request_id)
    assert running.done.data["stopped"] is True
    assert second.done.data["ok"] is True  # the queue moves on once a worker frees up
    assert f"Request {first.request_id} runs on worker" not in svc.log()  # never dispatched
    assert f"Request {second.request_id} runs on worker" in svc.log()
    health = svc.health()
    assert health["queue"] == 0 and health["active_requests"] == 0


def test_queued_request_whose_client_leaves_is_dropped(make_service: Callable[..., Service]) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 1, "queue_size": 2}})
    running = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    running.wait_for("token")
    waiting = RawStream(svc.port, {"message": "Hello"})
    request_id = waiting.request_id
    waiting.read_until(b"event: queued")
    assert svc.health()["queue"] == 1
    waiting.disconnect()
    deadline = time.monotonic() + 3
    while svc.health()["queue"] != 0:
        assert time.monotonic() < deadline, "abandoned request still queued"
        time.sleep(0.02)
    assert f"Client disconnected for request {request_id}" in svc.log()
    svc.cancel(running.request_id)
    running.done
    assert svc.health()["active_requests"] == 0

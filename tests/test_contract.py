"""The HTTP contract of DESIGN.md, over real HTTP to a real service with the real model."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.support import COUNTING, Service, Stream, chat

pytestmark = pytest.mark.timeout(120)


def test_stream_events_come_in_order_with_headers(service: Service) -> None:
    stream = Stream(service.url, {"message": COUNTING})
    done = stream.done
    names = [e.name for e in stream.events]
    assert names[0] == "init" and names[-1] == "done" and names.count("done") == 1
    assert set(names[1:-1]) <= {"token", "progress", "queued"}
    assert "token" in names
    assert stream.headers["cache-control"] == "no-cache"
    assert stream.headers["x-accel-buffering"] == "no"
    assert stream.headers["content-type"].startswith("text/event-stream")
    request_id = stream.events[0].data["request_id"]
    assert stream.headers["x-request-id"] == request_id
    assert uuid.UUID(request_id).version == 4
    assert done.data["ok"] is True
    assert done.data["mode_used"] == "chat"
    assert done.data["response"] == stream.text()
    assert done.data["response"].strip()


def test_mode_used_names_the_requested_mode(service: Service) -> None:
    events = chat(service.url, COUNTING, mode="brief")
    assert events[-1].data["mode_used"] == "brief"
    assert events[-1].data["finish_reason"] == "length"
    assert events[-1].data["usage"]["completion_tokens"] == 4


def test_history_is_used(service: Service) -> None:
    history = [
        {"role": "user", "content": "My name is Zorblax. Remember it."},
        {"role": "assistant", "content": "Nice to meet you, Zorblax."},
    ]
    with_history = chat(service.url, "What is my name?", mode="brief", history=history)[-1].data
    alone = chat(service.url, "What is my name?", mode="brief")[-1].data
    assert with_history["ok"] is True and alone["ok"] is True
    # Both turns reached the prompt (~20 tokens); whether the model uses them is its own business.
    assert with_history["usage"]["prompt_tokens"] >= alone["usage"]["prompt_tokens"] + 15, (with_history, alone)


def test_cancel_after_completion_is_not_found(service: Service) -> None:
    events = chat(service.url, "Say hello.")
    request_id = events[0].data["request_id"]
    assert service.cancel(request_id) == {"status": "not_found", "request_id": request_id}
    assert service.cancel(request_id) == {"status": "not_found", "request_id": request_id}


def test_double_cancel_is_idempotent(service: Service) -> None:
    stream = Stream(service.url, {"message": COUNTING, "mode": "long"})
    stream.wait_for("token", count=3)
    first = service.cancel(stream.request_id)
    second = service.cancel(stream.request_id)
    assert first["status"] == "cancelled"
    assert second["status"] in ("cancelled", "not_found")
    done = stream.done.data
    assert done["ok"] is False and done["stopped"] is True
    assert done["response"] == stream.text()
    assert [e.name for e in stream.events].count("done") == 1


def test_health_and_modes(service: Service) -> None:
    health = httpx.get(f"{service.url}/health").json()
    assert health["status"] == "ok"
    assert health["workers"]["total"] == 2 and health["workers"]["ready"] == 2
    modes = httpx.get(f"{service.url}/modes").json()
    assert {m["name"] for m in modes["modes"]} == {"chat", "brief", "long", "count"}
    assert modes["default"] == "chat"


def test_bookkeeping_is_empty_when_idle(service: Service) -> None:
    chat(service.url, "Say hello.")
    stream = Stream(service.url, {"message": COUNTING, "mode": "long"})
    stream.wait_for("token")
    service.cancel(stream.request_id)
    stream.done
    health = service.health()
    assert health["queue"] == 0 and health["active_requests"] == 0 and health["workers"]["busy"] == 0

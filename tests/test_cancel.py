"""Cancel and disconnect stop the computation, in decode and in prefill, without a respawn.

Each test proves the stop by the worker's own CPU time (psutil), and proves that no kill
was needed by the same worker pid serving the next request.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import pytest

from tests.support import COUNTING, RawStream, Service, Stream, chat, consecutive, long_prompt, wait_busy, wait_idle, write_config

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One worker, so "the next request" runs on the same process by construction."""
    root = tmp_path_factory.mktemp("one_worker")
    svc = Service(write_config(root / "config.toml", {"pool": {"workers": 1}}), root / "service.log")
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


def assert_same_worker_serves_next(svc: Service, pid: int) -> None:
    events = chat(svc.url, "What is the capital of France?")
    assert events[-1].data["ok"] is True, events[-1].data
    assert svc.worker_pids() == [pid]


def test_cancel_during_decode_stops_the_worker(one_worker: Service) -> None:
    stream = Stream(one_worker.url, {"message": COUNTING, "mode": "long"})
    stream.wait_for("token", count=5)
    pid = one_worker.worker_for(stream.request_id)
    cancelled_at = time.monotonic()
    assert one_worker.cancel(stream.request_id)["status"] == "cancelled"
    done = stream.done
    assert done.data.pop("stopped_by") in ("token", "native")  # between steps, or inside one
    assert done.data.pop("usage")["completion_tokens"] >= 5
    assert done.data == {"ok": False, "stopped": True, "response": stream.text(), "mode_used": "long"}
    assert done.at - cancelled_at < 3.0
    wait_idle(pid, within=3.0)
    assert_same_worker_serves_next(one_worker, pid)


def test_cancel_during_prefill_stops_the_worker(one_worker: Service) -> None:
    stream = Stream(one_worker.url, {"message": long_prompt(6000)})
    pid = one_worker.worker_for(stream.request_id)
    wait_busy(pid, cpu=random.uniform(0.3, 2.0))  # somewhere inside a ~50 s prefill
    assert not any(e.name == "token" for e in stream.events)
    cancelled_at = time.monotonic()
    assert one_worker.cancel(stream.request_id)["status"] == "cancelled"
    done = stream.done
    assert done.data["stopped"] is True and done.data["response"] == ""
    assert done.at - cancelled_at < 3.0
    wait_idle(pid, within=3.0)
    assert_same_worker_serves_next(one_worker, pid)


def test_disconnect_during_decode_stops_the_worker(one_worker: Service) -> None:
    stream = RawStream(one_worker.port, {"message": COUNTING, "mode": "long"})
    request_id = stream.request_id
    stream.read_until(b"event: token", count=5)
    pid = one_worker.worker_for(request_id)
    stream.disconnect()
    wait_idle(pid, within=3.0)
    assert f"Client disconnected for request {request_id}" in one_worker.log()
    assert_same_worker_serves_next(one_worker, pid)


def test_disconnect_during_prefill_stops_the_worker(one_worker: Service) -> None:
    stream = RawStream(one_worker.port, {"message": long_prompt(6000)})
    request_id = stream.request_id
    pid = one_worker.worker_for(request_id)
    wait_busy(pid, cpu=1.0)
    stream.disconnect()  # no token has flowed: only the receive() watch can notice this
    wait_idle(pid, within=3.0)
    assert f"Client disconnected for request {request_id}" in one_worker.log()
    assert_same_worker_serves_next(one_worker, pid)


def test_late_cancel_leaves_the_next_job_alone(one_worker: Service) -> None:
    first = chat(one_worker.url, "Say hello.")
    first_id = first[0].data["request_id"]
    second = Stream(one_worker.url, {"message": COUNTING, "mode": "brief"})
    second.wait_for("init")
    assert one_worker.cancel(first_id)["status"] == "not_found"
    done = second.done.data
    # Not stopped: it ran to its whole 4-token budget.
    assert done["ok"] is True and done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 4, done


def test_cancelling_one_stream_leaves_a_concurrent_one_intact(service: Service) -> None:
    victim = Stream(service.url, {"message": COUNTING, "mode": "long"})
    victim.wait_for("token", count=3)
    bystander = Stream(service.url, {"message": COUNTING, "mode": "count"})
    bystander.wait_for("token")
    service.cancel(victim.request_id)
    assert victim.done.data["stopped"] is True
    done = bystander.done.data
    # Its whole budget, with no token lost or repeated across the moment the other one stopped.
    assert done["ok"] is True and done["usage"]["completion_tokens"] == 64, done
    assert done["response"] == bystander.text() and consecutive(done["response"]), done["response"]


def test_the_context_serves_whole_answers_after_a_prefill_cancel(one_worker: Service) -> None:
    """After an abort inside llama_decode the context is cleared to what each sequence really
    holds and used again, with no reload: the next answer on the same worker counts on, whole."""
    stream = Stream(one_worker.url, {"message": long_prompt(6000)})
    pid = one_worker.worker_for(stream.request_id)
    wait_busy(pid, cpu=1.0)
    one_worker.cancel(stream.request_id)
    assert stream.done.data["stopped"] is True
    for _ in range(2):  # once on whatever the aborted sequence kept, once more on the cache it left
        done = chat(one_worker.url, COUNTING, mode="count")[-1].data
        assert done["ok"] is True and done["usage"]["completion_tokens"] == 64, done
        assert consecutive(done["response"]), done["response"]
    assert one_worker.worker_pids() == [pid]

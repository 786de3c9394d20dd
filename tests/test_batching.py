"""Many chats on one model copy: the sequences of one worker are decoded together, and a stop
of one of them, in any phase, stops only that one, within the abort callback's milliseconds,
while the others keep streaming with no token lost or repeated."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support import COUNTING, RawStream, Service, Stream, chat, consecutive, long_prompt, wait_idle, write_config

pytestmark = pytest.mark.timeout(240)

MakeService = Callable[..., Service]
NATIVE_STOP_S = 0.5  # the abort callback stops a llama_decode in milliseconds; the kill deadline is 1 s


@pytest.fixture(scope="module")
def batched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One worker with four slots: every concurrent request shares one model copy."""
    root = tmp_path_factory.mktemp("batched")
    svc = Service(write_config(root / "config.toml", {"pool": {"workers": 1, "slots": 4}}), root / "service.log")
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


def tokens(stream: Stream) -> list:
    return [e for e in stream.events if e.name == "token"]


def counting(mode: str = "long") -> dict:
    return {"message": COUNTING, "mode": mode}


def test_two_streams_on_one_worker_interleave(batched: Service) -> None:
    first, second = Stream(batched.url, counting("count")), Stream(batched.url, counting("count"))
    pid = batched.worker_for(first.request_id)
    assert batched.worker_for(second.request_id) == pid  # one worker, one model copy
    first_done, second_done = first.done, second.done
    assert first_done.data["ok"] and second_done.data["ok"]
    # Both streamed before either ended: decoded together, not one after the other.
    assert tokens(first)[0].at < second_done.at and tokens(second)[0].at < first_done.at
    for done in (first_done, second_done):  # each whole, whatever the batch did to the floats
        assert done.data["usage"]["completion_tokens"] == 64 and consecutive(done.data["response"]), done.data
    health = batched.health()
    assert health["slots"]["busy"] == 0 and health["active_requests"] == 0


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_stop_of_one_decoding_sequence_leaves_the_others_streaming(batched: Service, how: str) -> None:
    others = [Stream(batched.url, counting("count")) for _ in range(2)]
    pid = batched.worker_for(others[0].request_id)
    for other in others:
        other.wait_for("token", count=2)
    if how == "cancel":
        victim = Stream(batched.url, counting())
        victim.wait_for("token", count=3)
        stopped_at = time.monotonic()
        assert batched.cancel(victim.request_id)["status"] == "cancelled"
        done = victim.done
        assert done.data["stopped"] is True and done.data["stopped_by"] in ("token", "native")
        assert done.at - stopped_at < NATIVE_STOP_S
    else:
        raw = RawStream(batched.port, counting())
        request_id = raw.request_id
        raw.read_until(b"event: token", count=3)
        raw.disconnect()
        deadline = time.monotonic() + NATIVE_STOP_S * 3
        while request_id in batched.health(verbose=True)["worker_details"][0]["request_ids"]:
            assert time.monotonic() < deadline, "the disconnected sequence is still in its slot"
            time.sleep(0.01)
    for other in others:
        final = other.done.data
        assert final["ok"] is True and final["response"] == other.text()
        assert consecutive(final["response"]), final["response"]  # no token lost or repeated
    assert batched.worker_pids() == [pid]  # no kill
    wait_idle(pid, within=3.0)


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_stop_of_one_sequence_in_prefill_leaves_the_others_streaming(batched: Service, how: str) -> None:
    others = [Stream(batched.url, counting()) for _ in range(2)]
    pid = batched.worker_for(others[0].request_id)
    for other in others:
        other.wait_for("token", count=2)
    body = {"message": long_prompt(3000), "mode": "chat"}
    if how == "cancel":
        victim = Stream(batched.url, body)
        victim.wait_for("progress")  # its prompt is being read, piece by piece, between their tokens
        before = len(tokens(others[0]))
        stopped_at = time.monotonic()
        assert batched.cancel(victim.request_id)["status"] == "cancelled"
        done = victim.done
        assert done.data["stopped"] is True and done.data["response"] == ""
        assert done.data["stopped_by"] in ("native", "chunk")
        assert done.at - stopped_at < NATIVE_STOP_S
        assert len(tokens(others[0])) > before or others[0].wait_for("token", count=before + 1)
    else:
        raw = RawStream(batched.port, body)
        raw.request_id
        raw.read_until(b"event: progress")
        raw.disconnect()
        time.sleep(NATIVE_STOP_S)
        assert batched.health()["slots"]["busy"] == 2  # only the two counting streams remain
    for other in others:
        assert other.wait_for("token", count=len(tokens(other)) + 3)  # still streaming
        batched.cancel(other.request_id)
        final = other.done.data
        assert final["stopped"] is True and consecutive(final["response"]), final["response"]
    assert batched.worker_pids() == [pid]
    wait_idle(pid, within=3.0)


def test_prefill_is_aborted_inside_llama_decode_by_the_callback(make_service: MakeService) -> None:
    """With one sequence reading a long prompt in 512-token pieces, a cancel lands inside a
    llama_decode almost always: only the abort callback can end it in milliseconds. (With the
    callback gated off the stop waits for the piece to end: "chunk", hundreds of ms.)"""
    svc = make_service({"pool": {"workers": 1, "slots": 2}})
    for _ in range(3):
        stream = Stream(svc.url, {"message": long_prompt(3000), "mode": "chat"})
        stream.wait_for("progress")
        time.sleep(0.15)
        stopped_at = time.monotonic()
        svc.cancel(stream.request_id)
        done = stream.done
        assert done.data["stopped_by"] == "native", done.data
        assert done.at - stopped_at < NATIVE_STOP_S
    assert chat(svc.url, "What is the capital of France?")[-1].data["ok"] is True


def test_decode_steps_are_aborted_inside_llama_decode_too(batched: Service) -> None:
    """The compiled abort callback stays armed in decode steps: a stop of one of four decoding
    sequences lands inside a step's llama_decode (~50 ms of it in C against a few ms of Python
    between steps) and ends it at once, instead of waiting for the step to finish. With the
    callback armed for prefill steps only, no decode stop is ever "native".

    A cancel sent the moment a token arrives is correlated with the step boundary (measured:
    1 in 4 landed between steps on a quiet box, more under load), so each victim waits a random
    part of a step first, and victims keep coming until one lands in C, twelve at most."""
    others = [Stream(batched.url, counting("long")) for _ in range(3)]
    pid = batched.worker_for(others[0].request_id)
    for other in others:
        other.wait_for("token", count=2)
    tiers: list[str] = []
    while "native" not in tiers and len(tiers) < 12:
        victim = Stream(batched.url, counting())
        victim.wait_for("token", count=3)
        time.sleep(random.uniform(0.0, 0.03))  # anywhere in the next step (~30-50 ms of C)
        stopped_at = time.monotonic()
        assert batched.cancel(victim.request_id)["status"] == "cancelled"
        done = victim.done
        assert done.data["stopped"] is True and done.at - stopped_at < NATIVE_STOP_S
        tiers.append(done.data["stopped_by"])
    assert "native" in tiers, tiers  # twelve stops all between steps: ~2e-4 even at p = 1/2 each
    for other in others:
        assert other.wait_for("token", count=len(tokens(other)) + 2)  # the survivors go on
        batched.cancel(other.request_id)
        final = other.done.data
        assert final["stopped"] is True and consecutive(final["response"]), final["response"]
    assert batched.worker_pids() == [pid]
    wait_idle(pid, within=3.0)


def test_killed_worker_with_three_busy_slots_resumes_each_stream_once(make_service: MakeService) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 4}})
    streams = [Stream(svc.url, counting("count")) for _ in range(3)]
    cancelled = Stream(svc.url, counting())
    for stream in (*streams, cancelled):
        stream.wait_for("token", count=2)
    pid = svc.worker_for(streams[0].request_id)
    os.kill(pid, signal.SIGSTOP)  # so the cancel cannot be acknowledged before the kill
    svc.cancel(cancelled.request_id)
    os.kill(pid, signal.SIGKILL)
    final = cancelled.done.data
    assert final["stopped"] is True and final["response"] == cancelled.text()
    for stream in streams:
        stream.closed.wait(120)
        finals = [e.data for e in stream.events if e.name == "done"]
        assert len(finals) == 1 and finals[0]["ok"] is True, finals
        assert finals[0]["response"] == stream.text() and consecutive(stream.text()), stream.text()
    assert svc.log().count("Resuming request") == 3


def test_when_every_slot_is_busy_requests_queue_and_a_queued_one_can_be_cancelled(make_service: MakeService) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 2, "queue_size": 4}})
    running = [Stream(svc.url, counting()) for _ in range(2)]
    for stream in running:
        stream.wait_for("token")
    assert svc.health()["slots"] == {"per_worker": 2, "ready": 2, "busy": 2, "total": 2}
    first, second = Stream(svc.url, counting("brief")), Stream(svc.url, counting("brief"))
    assert first.wait_for("queued").data == {"position": 1}
    assert second.wait_for("queued").data == {"position": 2}
    cancelled_at = time.monotonic()
    svc.cancel(first.request_id)
    done = first.done
    assert done.data["stopped_by"] == "queued" and done.at - cancelled_at < 0.2
    assert second.wait_for("queued", count=2).data == {"position": 1}
    svc.cancel(running[0].request_id)
    assert second.done.data["ok"] is True  # it got the freed slot
    svc.cancel(running[1].request_id)
    running[1].done


def test_a_sequence_at_the_context_limit_ends_with_length_and_the_others_are_unaffected(tmp_path) -> None:
    config = write_config(tmp_path / "config.toml", {"pool": {"workers": 1, "slots": 2}, "model": {"n_ctx": 256}})
    svc = Service(config, tmp_path / "service.log")
    try:
        svc.start()
        long = Stream(svc.url, counting())  # 3000 tokens asked, 256 positions per sequence
        short = Stream(svc.url, counting("count"))
        long_done, short_done = long.done.data, short.done.data
        assert long_done["ok"] is True and long_done["finish_reason"] == "length"
        assert long_done["usage"]["prompt_tokens"] + long_done["usage"]["completion_tokens"] == 256
        assert consecutive(long_done["response"]), long_done["response"]
        # The other sequence got its whole budget, counted on, and was not cut by its neighbour's limit.
        assert short_done["ok"] is True and short_done["usage"]["completion_tokens"] == 64, short_done
        assert consecutive(short_done["response"]), short_done["response"]
    finally:
        svc.stop()


def test_a_client_that_stops_reading_blocks_no_worker_and_grows_no_memory(make_service: MakeService) -> None:
    import socket

    import psutil

    svc = make_service({"pool": {"workers": 1, "slots": 2}})
    assert svc.proc is not None
    web = psutil.Process(svc.proc.pid)
    stalled = RawStream(svc.port, counting())  # 3,000 tokens asked; it reads only the first bytes
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    request_id = stalled.request_id
    rss_before = web.memory_info().rss
    other = Stream(svc.url, counting("count"))  # the same worker, the other slot
    final = other.done.data
    assert final["ok"] is True and consecutive(final["response"])  # not held up by the silent reader
    assert request_id in svc.health(verbose=True)["worker_details"][0]["request_ids"]  # still generating
    time.sleep(3)
    assert web.memory_info().rss - rss_before < 50 * 2**20  # bounded: at most its token budget queued
    stalled.disconnect()
    deadline = time.monotonic() + 5
    while svc.health()["active_requests"]:
        assert time.monotonic() < deadline, "the silent client's request outlived its connection"
        time.sleep(0.05)

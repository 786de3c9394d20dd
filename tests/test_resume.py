"""Nothing lost, nothing hung: a worker lost mid-request (killed, crashed, or silent past the stall
timeout) has its uncancelled requests resumed on another worker, once; the pool is back to N
ready workers, and workers that were not hit keep their pid. A worker that crashes again and
again after becoming ready backs off and is given up on, instead of spinning."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable

import pytest

from tests.support import COUNTING, Service, Stream, alive, chat, long_prompt, wait_busy

pytestmark = pytest.mark.timeout(240)

MakeService = Callable[..., Service]
# Well above one 512-token prefill piece on one thread (~2 s), well below a test's patience.
FAST_STALL = {"pool": {"workers": 2, "slots": 2, "stall_timeout_s": 6.0}}


def dones(stream: Stream) -> list[dict]:
    stream.closed.wait(120)
    return [e.data for e in stream.events if e.name == "done"]


def counted(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


@pytest.mark.parametrize("phase", ["idle", "prefill", "decode"])
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSEGV", "SIGSTOP"])
def test_fault_matrix_every_client_gets_one_final_event_and_the_pool_recovers(
    make_service: MakeService, how: str, phase: str
) -> None:
    svc = make_service(FAST_STALL)
    body = {"message": long_prompt(1500), "mode": "brief"} if phase == "prefill" else {"message": COUNTING, "mode": "count"}
    victim = Stream(svc.url, body) if phase != "idle" else None
    if victim is not None:
        pid = svc.worker_for(victim.request_id)
        if phase == "decode":
            victim.wait_for("token", count=3)
        else:
            wait_busy(pid, cpu=0.3)
    else:
        pid = svc.worker_pids()[0]
    others = [p for p in svc.worker_pids() if p != pid]
    os.kill(pid, getattr(signal, how))
    if phase == "idle" and how == "SIGSTOP":
        # Not busy, so not stalled: it is caught once a request lands on it and it stays silent.
        victim = Stream(svc.url, {"message": COUNTING, "mode": "count"})
        victim2 = Stream(svc.url, {"message": COUNTING, "mode": "count"})  # one of the two lands there
        for stream in (victim, victim2):
            (final,) = dones(stream)
            assert final["ok"] is True, final
    elif victim is not None:
        (final,) = dones(victim)  # exactly one final event
        assert final["ok"] is True, final  # resumed, not lost
        tokens = "".join(e.data["t"] for e in victim.events if e.name == "token")
        assert final["response"] == tokens
        if phase == "decode":
            numbers = counted(tokens)
            assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), tokens  # none repeated or missing
        assert f"Resuming request {victim.request_id}" in svc.log()
    svc.wait_replaced(pid, workers=2)
    assert set(others) <= set(svc.worker_pids())  # the other worker was not disturbed
    assert chat(svc.url, "What is the capital of France?")[-1].data["ok"] is True
    health = svc.health()
    assert health["queue"] == 0 and health["active_requests"] == 0


def test_resumed_request_counts_every_streamed_token_once(make_service: MakeService) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 2}})
    solo = chat(svc.url, COUNTING, mode="count")[-1].data
    stream = Stream(svc.url, {"message": COUNTING, "mode": "count"})
    stream.wait_for("token", count=10)
    pid = svc.worker_for(stream.request_id)
    os.kill(pid, signal.SIGKILL)
    (final,) = dones(stream)
    assert final["ok"] is True and final["finish_reason"] == "length"
    assert final["usage"]["completion_tokens"] == solo["usage"]["completion_tokens"] == 64  # the budget, not more
    assert final["usage"]["prompt_tokens"] == solo["usage"]["prompt_tokens"]
    assert "tokens kept" in svc.log()


def test_a_second_loss_ends_the_request_with_an_error(make_service: MakeService) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 2}})
    stream = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    stream.wait_for("token", count=3)
    first = svc.worker_for(stream.request_id)
    os.kill(first, signal.SIGKILL)
    count = len([e for e in stream.events if e.name == "token"])
    stream.wait_for("token", count=count + 3)  # resumed on the replacement, streaming again
    second = svc.worker_for(stream.request_id)
    assert second != first
    os.kill(second, signal.SIGKILL)
    (final,) = dones(stream)
    assert final["ok"] is False and "died" in final["error"]
    svc.wait_replaced(second, workers=1)


def test_a_cancelled_request_is_never_resumed(make_service: MakeService) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 2}})
    stream = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    stream.wait_for("token", count=3)
    pid = svc.worker_for(stream.request_id)
    os.kill(pid, signal.SIGSTOP)  # it cannot acknowledge: the cancel ends with the kill
    assert svc.cancel(stream.request_id)["status"] == "cancelled"
    assert svc.cancel(stream.request_id)["status"] == "cancelled"  # a second cancel of a live request
    (final,) = dones(stream)
    assert final["stopped"] is True and final["stopped_by"] == "kill"
    assert svc.cancel(stream.request_id)["status"] == "not_found"  # and once it has ended
    assert final["response"] == "".join(e.data["t"] for e in stream.events if e.name == "token")
    assert f"Resuming request {stream.request_id}" not in svc.log()
    svc.wait_replaced(pid, workers=1)


def test_worker_silent_past_the_stall_timeout_is_replaced_without_any_cancel(make_service: MakeService) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 2, "stall_timeout_s": 2.0}})
    stream = Stream(svc.url, {"message": COUNTING, "mode": "count"})
    stream.wait_for("token", count=3)
    pid = svc.worker_for(stream.request_id)
    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)  # a driver hang, a native deadlock: no message, no cancel
    (final,) = dones(stream)
    assert final["ok"] is True
    waited = stream.events[-1].at - stopped_at
    assert 2.0 < waited < 60, waited  # the watchdog, not a client timeout
    assert "sent nothing for" in svc.log()
    svc.wait_replaced(pid, workers=1)


def test_worker_that_crashes_after_ready_backs_off_then_is_given_up(make_service: MakeService) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 1, "restart_budget": 2, "restart_backoff_s": 0.2,
                                 "crash_window_s": 120.0}})
    seen: list[int] = []
    for _ in range(4):  # crash 1 is replaced at once, 2 and 3 after a growing delay, 4 is past the budget
        deadline = time.monotonic() + 60
        while True:
            health = svc.health()
            pids = health["workers"]["pids"]
            if health["workers"]["ready"] == 1 and pids and pids[0] not in seen:
                break
            assert time.monotonic() < deadline, svc.log()[-3000:]
            time.sleep(0.05)
        seen.append(pids[0])
        os.kill(pids[0], signal.SIGSEGV)
    deadline = time.monotonic() + 10
    while "giving up" not in svc.log():
        assert time.monotonic() < deadline, svc.log()[-3000:]
        time.sleep(0.1)
    log = svc.log()
    assert "Respawning worker 0 in 0.0 s" in log  # the first crash in a while: replaced at once
    assert "Respawning worker 0 in 0.2 s" in log and "Respawning worker 0 in 0.4 s" in log
    health = svc.health()
    assert health["status"] == "unavailable" and health["workers"]["given_up"] == 1
    assert not alive(seen[-1])


def test_a_worker_idle_past_the_stall_timeout_is_not_stalled(make_service: MakeService) -> None:
    """Silence counts only while there is work: the clock restarts when an idle worker gets a job."""
    svc = make_service({"pool": {"workers": 1, "slots": 2, "stall_timeout_s": 2.0}})
    pid = svc.worker_pids()[0]
    time.sleep(3.0)  # idle, longer than the stall timeout
    assert chat(svc.url, COUNTING, mode="count")[-1].data["ok"] is True
    assert svc.worker_pids() == [pid]
    assert "sent nothing for" not in svc.log()

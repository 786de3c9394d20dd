"""Workers that are stopped, wedged in C, killed or never load; a service that is killed or
told to stop. Each test starts its own service: these tests break processes on purpose."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

from tests.support import COUNTING, Service, Stream, alive, chat, long_prompt

pytestmark = pytest.mark.timeout(180)

MakeService = Callable[..., Service]


def wait_gone(pid: int, within: float) -> None:
    deadline = time.monotonic() + within
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive after {within} s"
        time.sleep(0.02)


def test_stopped_worker_is_killed_at_the_deadline_and_replaced(make_service: MakeService) -> None:
    svc = make_service()
    bystander = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    victim = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    victim.wait_for("token", count=3)
    pid = svc.worker_for(victim.request_id)
    bystander_pid = svc.worker_for(bystander.request_id)
    os.kill(pid, signal.SIGSTOP)
    cancelled_at = time.monotonic()
    assert svc.cancel(victim.request_id)["status"] == "cancelled"
    done = victim.done
    assert done.data["ok"] is False and done.data["stopped"] is True
    assert done.data["response"] == victim.text()
    assert 0.9 < done.at - cancelled_at < 3.0  # judged at the 1 s deadline, not before
    wait_gone(pid, within=3.0)
    new_pids = svc.wait_replaced(pid, workers=2)
    assert bystander_pid in new_pids  # nothing else in the pool was disturbed
    assert not bystander.closed.is_set()
    svc.cancel(bystander.request_id)
    assert bystander.done.data["stopped"] is True
    assert "missed the 1.0 s cancel deadline" in svc.log()


def test_worker_wedged_in_native_code_is_killed_and_replaced(make_service: MakeService) -> None:
    svc = make_service({"pool": {"workers": 1}})
    stream = Stream(svc.url, {"message": "Hello", "debug_wedge_s": 60})
    pid = svc.worker_for(stream.request_id)
    time.sleep(0.3)
    cancelled_at = time.monotonic()
    svc.cancel(stream.request_id)
    done = stream.done
    assert done.data["stopped"] is True
    assert done.at - cancelled_at < 3.0
    wait_gone(pid, within=3.0)
    svc.wait_replaced(pid, workers=1)
    assert "Current thread" in svc.log() or "Thread 0x" in svc.log()  # faulthandler's stack dump
    assert chat(svc.url, "What is the capital of France?")[-1].data["ok"] is True


def test_killed_service_leaves_no_process_behind(make_service: MakeService) -> None:
    """Parent SIGKILL: every descendant (workers and the spawn context's resource tracker) is
    gone within 2 s: the workers by PR_SET_PDEATHSIG, the tracker when its pipe closes."""
    import psutil

    svc = make_service()
    stream = Stream(svc.url, {"message": long_prompt(3000)})
    busy_pid = svc.worker_for(stream.request_id)
    assert svc.proc is not None
    descendants = [p.pid for p in psutil.Process(svc.proc.pid).children(recursive=True)]
    assert busy_pid in descendants and len(descendants) >= 3  # two workers and the resource tracker
    svc.known_pids |= set(descendants)
    svc.proc.kill()
    for pid in descendants:
        wait_gone(pid, within=2.0)


@pytest.mark.parametrize("group", [False, True], ids=["service", "process-group"])
def test_sigterm_ends_every_request_in_every_phase_in_bounded_time(make_service: MakeService, group: bool) -> None:
    """SIGTERM with streams queued, in prefill, in decode and on a stopped worker, and a whole
    /v1 request in flight: each client gets its final answer within cancel_deadline_s +
    kill_grace_s + 1 s, the service exits 0 and leaves no process behind. The same when the
    signal goes to the whole process group (`timeout`, a container runtime): a worker must not
    die of it first, and the shutdown must never log a crash or start a respawn."""
    import httpx

    svc = make_service({"pool": {"workers": 2, "slots": 1, "queue_size": 2}}, new_session=True)
    decoding = Stream(svc.url, {"message": COUNTING, "mode": "long"})
    decoding.wait_for("token", count=2)
    stopped_pid = svc.worker_for(decoding.request_id)
    prefill = Stream(svc.url, {"message": long_prompt(3000)})
    svc.worker_for(prefill.request_id)
    queued = Stream(svc.url, {"message": "Hello"})
    queued.wait_for("queued")
    whole: dict = {}

    def whole_request() -> None:
        try:
            r = httpx.post(f"{svc.url}/v1/completions", json={"model": "edison", "prompt": "Hi", "max_tokens": 8},
                           timeout=60)
            whole.update(status=r.status_code, body=r.json(), at=time.monotonic())
        except Exception as exc:  # noqa: BLE001
            whole.update(error=repr(exc))

    import threading

    waiter = threading.Thread(target=whole_request, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 10
    while svc.health()["queue"] < 2:
        assert time.monotonic() < deadline, svc.health()
        time.sleep(0.02)
    pids = svc.worker_pids()
    os.kill(stopped_pid, signal.SIGSTOP)  # this one cannot even acknowledge
    assert svc.proc is not None
    sent_at = time.monotonic()
    if group:
        os.killpg(svc.proc.pid, signal.SIGTERM)
    else:
        svc.proc.send_signal(signal.SIGTERM)
    bound = 1.0 + 0.2 + 1.0  # cancel_deadline_s + kill_grace_s + 1 s
    for stream in (decoding, prefill, queued):
        done = stream.done
        assert done.data == {"ok": False, "error": "server shutting down"}
        assert done.at - sent_at < bound
    waiter.join(bound + 1)
    assert whole.get("status") == 503 and whole["body"]["error"]["code"] == "shutting_down", whole
    assert whole["at"] - sent_at < bound
    assert svc.proc.wait(timeout=15) == 0
    for pid in pids:
        wait_gone(pid, within=1.0)
    log = svc.log()
    assert "exited with code" not in log and "Respawning" not in log and "Traceback" not in log


def test_model_that_fails_to_load_backs_off_and_health_says_503(make_service: MakeService, tmp_path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"this is not a GGUF file" * 100)
    svc = make_service(
        {"model": {"path": str(bad)}, "pool": {"workers": 1, "restart_budget": 2, "restart_backoff_s": 0.1}},
        wait_ready=False,
    )
    deadline = time.monotonic() + 60
    while "giving up" not in svc.log():
        assert time.monotonic() < deadline, svc.log()
        time.sleep(0.2)
    import httpx

    response = httpx.get(f"{svc.url}/health")
    assert response.status_code == 503
    assert response.json()["workers"]["ready"] == 0
    assert svc.log().count("Model failed to load") == 3  # the first start and two respawns
    assert "Respawning worker 0 in 0.1 s" in svc.log() and "Respawning worker 0 in 0.2 s" in svc.log()
    refused = httpx.post(f"{svc.url}/chat/stream", json={"message": "Hello"})
    assert refused.status_code == 503 and "no model worker" in refused.json()["error"]

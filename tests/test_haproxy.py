"""Two Edison instances behind a real HAProxy, configured by `edison haproxy-config`: Stop still
stops, through the proxy.

Each instance has one worker (so a request's worker is known by construction, and the CPU of
this shared box stays free) and the real model. The stops are proved the way tests/test_cancel.py
proves them: the worker's own CPU time falls to idle, and the same pid serves the next request.
Which instance ran a request is read from the instances' own logs, never from the proxy.

HAProxy is the Debian package, installed by scripts/install-haproxy.sh (`make test` runs it);
without it these tests skip, and say why.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.haproxy_support import HAPROXY, Proxy, cancel_everything, owner, server_name, wait_stopped
from tests.support import (
    COUNTING,
    REPO,
    RawStream,
    Service,
    Stream,
    alive,
    chat,
    long_prompt,
    wait_busy,
    write_config,
)

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        shutil.which("haproxy") is None and not os.path.exists(HAPROXY),
        reason="HAProxy NOT INSTALLED: the multi-box tests did not run. As root: sh scripts/install-haproxy.sh",
    ),
]

# One worker and one thread per instance; a queue of one, so "queue full" is two requests away.
# prefill_chunk above the prompt: no progress event flows during a prefill, the strictest case
# for a disconnect (nothing is written that could fail).
INSTANCE = {"pool": {"workers": 1, "slots": 1, "queue_size": 1, "prefill_chunk": 8192}, "model": {"threads": 1}}


def start_pair(root: Path) -> list[Service]:
    services = [Service(write_config(root / f"config{i}.toml", INSTANCE), root / f"edison{i}.log") for i in range(2)]
    for svc in services:
        svc.start(wait_ready=False)  # both load the model at once
    for svc in services:
        svc.wait_ready()
    return services


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Service]]:
    services: list[Service] = []
    try:
        services = start_pair(tmp_path_factory.mktemp("pair"))
        yield services
    finally:
        for svc in services:
            svc.stop()


@pytest.fixture(scope="module")
def proxy(pair: list[Service], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    px = Proxy(pair, tmp_path_factory.mktemp("proxy"))
    try:
        yield px.start()
    finally:
        px.stop()


@pytest.fixture(autouse=True)
def settled(request: pytest.FixtureRequest) -> Iterator[None]:
    """Each test starts with the shared instances idle: a previous stop may still be landing."""
    if "pair" not in request.fixturenames:
        yield
        return
    pair = request.getfixturevalue("pair")
    for svc in pair:
        wait_until_free(svc)
    yield
    cancel_everything(pair)  # a failed test's leftovers must not fail the next one


def wait_until_free(svc: Service, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (h := svc.health())["workers"]["busy"] or h["active_requests"]:
        assert time.monotonic() < deadline, f"{svc.url} still busy: {h}"
        time.sleep(0.05)


def cancel(proxy: Proxy, request_id: str) -> dict:
    return httpx.post(f"{proxy.url}/chat/cancel", json={"request_id": request_id}, timeout=5).json()


def assert_same_worker_serves_next(svc: Service, pid: int) -> None:
    events = chat(svc.url, "What is the capital of France?")
    assert events[-1].data["ok"] is True, events[-1].data
    assert svc.worker_pids() == [pid]


# The rendered configuration.


def test_rendered_config_is_valid_haproxy(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edison", "haproxy-config", "--bind", "0.0.0.0:8811", "10.0.0.11:8811", "10.0.0.12:8811"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout
    (tmp_path / "haproxy.cfg").write_text(out)
    check = subprocess.run([HAPROXY, "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "server edison1 10.0.0.11:8811" in out and "server edison2 10.0.0.12:8811" in out
    assert "[WARNING]" not in check.stdout + check.stderr


def test_bad_backend_address_is_refused_by_name() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "edison", "haproxy-config", "--bind", "0.0.0.0:8811", "box1:8811", "box2"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert run.returncode == 2
    assert "backend 'box2' is not HOST:PORT" in run.stderr and run.stdout == ""


# 1. Cancel by id reaches the instance that runs the request.


@pytest.mark.parametrize("order", ["first_started_first", "last_started_first"])
def test_cancel_through_the_proxy_stops_the_owning_worker(pair: list[Service], proxy: Proxy, order: str) -> None:
    streams = [Stream(proxy.url, {"message": COUNTING, "mode": "long"})]
    try:
        streams[0].wait_for("token")
        streams.append(Stream(proxy.url, {"message": COUNTING, "mode": "long"}))
        streams[1].wait_for("token")
        owners = [owner(pair, s.request_id) for s in streams]
        assert sorted(owners) == [0, 1], f"both streams on instance {owners[0]}: leastconn should spread them"
        pids = [pair[i].worker_for(s.request_id) for i, s in zip(owners, streams)]
        assert all(s.headers and s.headers["x-request-id"] == s.request_id for s in streams)

        for k in ([0, 1] if order == "first_started_first" else [1, 0]):
            other = 1 - k
            assert cancel(proxy, streams[k].request_id) == {"status": "cancelled", "request_id": streams[k].request_id}
            done = streams[k].done.data
            assert done["ok"] is False and done["stopped"] is True, done
            wait_stopped(pids[k], within=3.0)
            if not streams[other].closed.is_set():  # the other one is untouched: still counting
                assert not any(e.name == "done" for e in streams[other].events)
    finally:
        cancel_everything(pair)

    for i, pid in zip(owners, pids):
        assert_same_worker_serves_next(pair[i], pid)


def test_cancel_of_an_unknown_id_is_not_found_through_the_proxy(proxy: Proxy) -> None:
    request_id = "3f1e4c2a-0000-4000-8000-000000000000"
    assert cancel(proxy, request_id) == {"status": "not_found", "request_id": request_id}


# 2. A disconnect through the proxy during a long prefill.


def test_disconnect_during_prefill_through_the_proxy_idles_the_owning_worker(pair: list[Service], proxy: Proxy) -> None:
    stream = RawStream(proxy.port, {"message": long_prompt(6000)})
    request_id = stream.request_id
    svc = pair[owner(pair, request_id)]
    pid = svc.worker_for(request_id)
    wait_busy(pid, cpu=1.0)  # inside a ~60 s single-chunk prefill: no byte is flowing
    assert b"event: progress" not in stream.received and b"event: token" not in stream.received
    stream.disconnect()
    wait_stopped(pid, within=3.0)
    assert f"Client disconnected for request {request_id}" in svc.log()
    assert_same_worker_serves_next(svc, pid)


# 4. A full queue on one instance: the request is retried on the other.


def test_request_refused_by_a_full_instance_is_served_by_the_other(pair: list[Service], proxy: Proxy) -> None:
    full, free = pair
    running = Stream(full.url, {"message": COUNTING, "mode": "long"})  # direct: the proxy sees no load
    running.wait_for("token")
    queued = Stream(full.url, {"message": COUNTING, "mode": "long"})
    queued.wait_for("queued")
    assert httpx.post(f"{full.url}/chat/stream", json={"message": "one too many"}).status_code == 503
    retries_before = int(proxy.stats()[server_name(0)]["wretr"])
    try:
        for _ in range(4):  # leastconn sees both idle: at least one of these is sent to `full` first
            events = chat(proxy.url, "What is the capital of France?")
            assert events[-1].data["ok"] is True, events[-1].data
            assert owner(pair, events[0].data["request_id"]) == 1
        assert int(proxy.stats()[server_name(0)]["wretr"]) > retries_before, "no request was ever sent to the full instance"
    finally:
        for s in (queued, running):
            full.cancel(s.request_id)
            s.done


# 5. The `openai` client through the proxy.


def openai_client(proxy: Proxy, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused", max_retries=0, **{"timeout": 60, **kw})  # type: ignore[arg-type]


def test_openai_stream_closed_through_the_proxy_stops_the_worker(pair: list[Service], proxy: Proxy) -> None:
    stream = openai_client(proxy).chat.completions.create(
        model="edison-long", messages=[{"role": "user", "content": COUNTING}], stream=True, max_tokens=2000
    )
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if len(chunks) >= 5:
            break
    request_id = chunks[0].id
    svc = pair[owner(pair, request_id)]
    pid = svc.worker_for(request_id)
    wait_busy(pid, cpu=0.3)
    stream.close()
    wait_stopped(pid, within=3.0)
    assert f"Client disconnected for request {request_id}" in svc.log()
    assert_same_worker_serves_next(svc, pid)


def test_openai_streams_cancelled_by_their_ids_through_the_proxy(pair: list[Service], proxy: Proxy) -> None:
    """The stick table learns /v1 ids too: each cancel by a chunk's `id` reaches its own box."""
    streams = []
    for _ in range(2):
        stream = openai_client(proxy).chat.completions.create(
            model="edison-long", messages=[{"role": "user", "content": COUNTING}], stream=True, max_tokens=2000
        )
        streams.append((stream, next(iter(stream))))
    ids = [first.id for _, first in streams]
    assert sorted(owner(pair, i) for i in ids) == [0, 1]
    for (stream, _), request_id in zip(streams, ids):
        assert cancel(proxy, request_id) == {"status": "cancelled", "request_id": request_id}
        reasons = [c.choices[0].finish_reason for c in stream if c.choices]
        assert reasons[-1] == "cancelled", reasons[-3:]


def test_openai_whole_request_timed_out_through_the_proxy_stops_the_worker(pair: list[Service], proxy: Proxy) -> None:
    """No header has been sent when a non-streaming client gives up: the silent phase."""
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            openai_client(proxy, timeout=6).chat.completions.create(
                model="edison", messages=[{"role": "user", "content": long_prompt(6000)}], max_tokens=8
            )
        except BaseException as exc:  # noqa: BLE001 - the timeout is the point
            errors.append(exc)

    disconnects = [svc.log().count("Client disconnected for request") for svc in pair]
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    busy = None
    deadline = time.monotonic() + 10
    while busy is None:  # the request id is only in the answer, which never comes: find the busy worker
        assert time.monotonic() < deadline, "the request reached no worker"
        busy = next((svc for svc in pair if svc.health()["workers"]["busy"]), None)
        time.sleep(0.05)
    pid = busy.worker_pids()[0]
    asker.join(timeout=30)
    assert errors and isinstance(errors[0], openai.APITimeoutError), errors
    wait_stopped(pid, within=3.0)
    assert [svc.log().count("Client disconnected for request") for svc in pair] == [
        n + (svc is busy) for n, svc in zip(disconnects, pair)
    ]
    assert_same_worker_serves_next(busy, pid)


# 3. An instance that dies leaves the rotation at once and rejoins after its restart.


def test_killed_instance_is_routed_around_and_rejoins(tmp_path: Path) -> None:
    pair: list[Service] = []
    px = None
    try:
        pair = start_pair(tmp_path)
        px = Proxy(pair, tmp_path).start()
        victim = pair[0]
        streams = [Stream(px.url, {"message": COUNTING, "mode": "long"})]
        streams[0].wait_for("token")
        streams.append(Stream(px.url, {"message": COUNTING, "mode": "long"}))
        streams[1].wait_for("token")
        on_victim, survivor = sorted(streams, key=lambda s: owner(pair, s.request_id))
        assert owner(pair, on_victim.request_id) == 0 and owner(pair, survivor.request_id) == 1
        doomed = [victim.proc.pid, *victim.worker_pids()]  # type: ignore[union-attr]
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)
        victim.proc.wait(timeout=5)  # type: ignore[union-attr]
        killed_at = time.monotonic()

        # Its stream ends, without a `done` (docs/multi-box.md says so); the other box's goes on.
        assert on_victim.closed.wait(5), "the dead box's stream is still open"
        assert not any(e.name == "done" for e in on_victim.events)  # cut off, not ended
        assert not survivor.closed.is_set()
        assert cancel(px, survivor.request_id)["status"] == "cancelled"
        assert survivor.done.data["stopped"] is True

        for _ in range(4):  # the health check may not have noticed yet: refused, then retried
            events = chat(px.url, "What is the capital of France?")
            assert events[-1].data["ok"] is True, events[-1].data
            assert owner(pair, events[0].data["request_id"]) == 1
        px.wait_status(0, "DOWN", timeout=10.0)
        down_after = (time.monotonic() - killed_at) - int(px.stats()[server_name(0)]["lastchg"])  # whole seconds
        assert down_after < 2 * 1 + 3 + 1, f"out of the rotation {down_after:.1f} s after the kill"  # fall x inter + check timeout
        assert not any(alive(pid) for pid in doomed)
        victim.known_pids -= set(doomed)  # gone and reaped: never signal a pid that may be reused

        victim.start()  # same port
        px.wait_status(0, "UP", timeout=10.0)
        first = Stream(px.url, {"message": COUNTING, "mode": "long"})
        first.wait_for("token")
        second = Stream(px.url, {"message": COUNTING, "mode": "long"})
        second.wait_for("token")
        assert sorted(owner(pair, s.request_id) for s in (first, second)) == [0, 1]
        for s in (first, second):
            assert cancel(px, s.request_id)["status"] == "cancelled"
            assert s.done.data["stopped"] is True
    finally:
        if px:
            px.stop()
        for svc in pair:
            svc.stop()

"""Several models on one box (issue #23): both bundled models, real workers, real loads.

Each model gets its own pool of worker processes; a request names its model. Checked here:
two models answer in turn and at once; under a limit of one, the least recently used idle
model is unloaded (its workers exit) and a busy one never is; keep_alive expiry and
keep_alive 0; a cancel and a disconnect while a model loads end the request at once and the
load itself (the loading worker is killed); an unknown model is a 404; `edison models`.
A slow load comes from `debug.load_wedge_s` (the worker sleeps in C before loading, deaf to
every flag, as a long native load is): only the kill tier can end it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import psutil
import pytest

from tests.support import COUNTING, REPO, Service, Stream, consecutive

pytestmark = pytest.mark.timeout(240)

MakeService = Callable[..., Service]
ONE = {"workers": 1, "slots": 2}  # per model: one worker, two sequences


def two_models(**pool: Any) -> dict[str, Any]:
    """`gemma` (the default: the counting workload) and `small` (SmolLM2, the bundled default)."""
    return {
        "default_model": "gemma",
        "models": {"gemma": {"path": "gemma3-270m", **ONE}, "small": {"path": "smollm2-135m", **ONE}},
        "pool": {"workers": 1, "slots": 2, **pool},
    }


def models(svc: Service) -> dict[str, dict[str, Any]]:
    listing = httpx.get(f"{svc.url}/models", timeout=5).json()
    found = {m["name"]: m for m in listing["models"]}
    for m in found.values():
        svc.known_pids |= set(m["workers"])
    return found


def wait_state(svc: Service, name: str, state: str, within: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        found = models(svc)[name]
        if found["state"] == state:
            return found
        assert time.monotonic() < deadline, f"model {name} never became {state}: {found}"
        time.sleep(0.05)


def count(svc: Service, model: str | None = None, mode: str = "count", **extra: Any) -> Stream:
    body: dict[str, Any] = {"message": COUNTING, "mode": mode, **extra}
    if model is not None:
        body["model"] = model
    return Stream(svc.url, body)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, within: float) -> float:
    start = time.monotonic()
    while not gone(pid):
        assert time.monotonic() - start < within, f"process {pid} still alive after {within} s"
        time.sleep(0.01)
    return time.monotonic() - start


def test_two_models_answer_in_turn_and_at_once(make_service: MakeService) -> None:
    svc = make_service(two_models())
    assert models(svc)["gemma"]["state"] == "ready" and models(svc)["small"]["state"] == "unloaded"

    first = count(svc)  # no model named: the default
    assert first.wait_for("init").data["model"] == "gemma"
    assert first.done.data["ok"] and consecutive(first.done.data["response"])
    second = count(svc, "small", mode="chat")
    assert second.wait_for("init").data["model"] == "small"
    assert second.done.data["ok"] and second.done.data["usage"]["completion_tokens"] > 0
    both = models(svc)
    assert both["gemma"]["state"] == both["small"]["state"] == "ready"
    assert set(both["gemma"]["workers"]).isdisjoint(both["small"]["workers"])  # a worker per model

    streams = {name: count(svc, name, mode="count") for name in ("gemma", "small")}
    for name, stream in streams.items():  # at once: each runs on a worker of its own model
        details = svc.health(verbose=True)["worker_details"]
        while not any(stream.request_id in d["request_ids"] for d in details):
            time.sleep(0.02)
            details = svc.health(verbose=True)["worker_details"]
        running = next(d for d in details if stream.request_id in d["request_ids"])
        assert running["model"] == name and running["pid"] in both[name]["workers"]
    for stream in streams.values():
        assert stream.done.data["ok"] and stream.done.data["usage"]["completion_tokens"] > 0
    metrics = httpx.get(f"{svc.url}/metrics", timeout=5).text
    assert 'edison_model_loaded{model="small"} 1.0' in metrics and 'edison_model_loaded{model="gemma"} 1.0' in metrics
    v1 = httpx.get(f"{svc.url}/v1/models", timeout=5).json()["data"]
    assert [(m["id"], m["loaded"]) for m in v1[:2]] == [("gemma", True), ("small", True)]


def threads_of(svc: Service, pid: int) -> int:
    return next(d["threads"] for d in svc.health(verbose=True)["worker_details"] if d["pid"] == pid)


def wait_threads(svc: Service, pid: int, threads: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while (now := threads_of(svc, pid)) != threads:
        assert time.monotonic() < deadline, f"worker {pid} computes with {now} threads, not {threads}"
        time.sleep(0.02)


def test_two_busy_models_split_the_cores_and_one_alone_takes_them_back(make_service: MakeService) -> None:
    """Each model's worker is sized for the whole box; two computing at once take half each (more
    threads than cores spin at llama.cpp's barriers: edison/pool/cpu.py), and the one left
    running takes every core back at its next step. On one core there is nothing to split."""
    cores = os.cpu_count() or 1
    svc = make_service(two_models())
    gemma = count(svc, "gemma", mode="long")
    gemma_pid = svc.worker_for(gemma.request_id)
    gemma.wait_for("token")
    assert threads_of(svc, gemma_pid) == cores  # alone: all of them

    small = count(svc, "small", mode="long")
    small_pid = svc.worker_for(small.request_id, timeout=60)
    small.wait_for("token")
    wait_threads(svc, gemma_pid, max(1, cores // 2))
    wait_threads(svc, small_pid, max(1, cores // 2))
    assert not gemma.events[-1].name == "done" and not small.events[-1].name == "done"

    svc.cancel(small.request_id)
    assert small.done.data["stopped"] is True
    wait_threads(svc, gemma_pid, cores)  # alone again, still counting
    gemma.wait_for("token", count=sum(e.name == "token" for e in gemma.events) + 5)
    svc.cancel(gemma.request_id)
    assert gemma.done.data["stopped"] is True
    assert threads_of(svc, gemma_pid) == cores and gemma_pid in models(svc)["gemma"]["workers"]


def test_under_a_limit_of_one_the_least_recently_used_idle_model_is_unloaded(make_service: MakeService) -> None:
    svc = make_service(two_models(max_loaded_models=1))
    gemma_pid = models(svc)["gemma"]["workers"][0]

    stream = count(svc, "small", mode="chat")
    loading = stream.wait_for("progress", timeout=30)
    assert loading.data["phase"] == "loading" and loading.data["model"] == "small"
    assert stream.done.data["ok"]
    wait_gone(gemma_pid, within=5)  # unloaded to make room: its worker exited, every byte returned
    now = models(svc)
    assert now["gemma"]["state"] == "unloaded" and now["small"]["state"] == "ready"
    small_pid = now["small"]["workers"][0]

    back = count(svc, "gemma")  # and back: now small is the one to go
    assert back.done.data["ok"] and consecutive(back.done.data["response"])
    wait_gone(small_pid, within=5)
    assert [m["state"] for m in models(svc).values()] == ["ready", "unloaded"]


def test_a_model_with_requests_in_flight_is_never_unloaded(make_service: MakeService) -> None:
    svc = make_service(two_models(max_loaded_models=1))
    busy = count(svc, "gemma", mode="long")  # a long count keeps gemma busy
    busy.wait_for("token", timeout=30)
    pid = svc.worker_for(busy.request_id)

    refused = httpx.post(f"{svc.url}/chat/stream", json={"message": "Hi", "model": "small"}, timeout=10)
    assert refused.status_code == 503 and "in flight" in refused.json()["error"], refused.text
    unload = httpx.post(f"{svc.url}/models/unload", json={"model": "gemma"}, timeout=10)
    assert unload.status_code == 409, unload.text
    assert svc.worker_for(busy.request_id) == pid and not gone(pid)
    svc.cancel(busy.request_id)
    assert busy.done.data["stopped"] is True
    # Idle now: the same request loads small in its place.
    assert count(svc, "small", mode="chat").done.data["ok"]
    wait_gone(pid, within=5)


def test_keep_alive_unloads_an_idle_model_and_zero_unloads_at_once(make_service: MakeService) -> None:
    config = two_models()
    config["models"]["small"]["keep_alive_s"] = 1.0
    svc = make_service(config)
    assert count(svc, "small", mode="chat").done.data["ok"]
    pid = models(svc)["small"]["workers"][0]
    wait_state(svc, "small", "unloaded", within=10)
    wait_gone(pid, within=5)

    assert count(svc, "gemma", keep_alive=0).done.data["ok"]  # like Ollama's keep_alive: 0
    wait_state(svc, "gemma", "unloaded", within=3)
    again = count(svc)  # the default loads again on demand
    assert again.done.data["ok"] and consecutive(again.done.data["response"])


@pytest.mark.parametrize("how", ["cancel", "disconnect"])
def test_a_stop_during_a_load_ends_the_request_and_the_load(make_service: MakeService, how: str) -> None:
    config = two_models()
    config["debug"] = {"allow_wedge": True, "load_wedge_s": 30.0}  # each load: 30 s in C first
    svc = make_service(config, wait_ready=False)
    svc.wait_ready(timeout=90)
    stream = count(svc, "small", mode="chat")
    assert stream.wait_for("progress", timeout=10).data["phase"] == "loading"
    pid = wait_state(svc, "small", "loading")["workers"][0]
    time.sleep(0.3)  # well inside the load

    started = time.monotonic()
    if how == "cancel":
        svc.cancel(stream.request_id)
        done = stream.done
        assert done.data["stopped"] is True and done.data["stopped_by"] == "queued"
        assert done.at - started < 0.5  # the request ends at once, as in the queue
    else:
        stream.disconnect()
    # Nobody else wants the model: the loading worker is killed, not left to finish its load.
    assert wait_gone(pid, within=3) < 2.0
    wait_state(svc, "small", "unloaded", within=3)
    assert "its load was abandoned" in svc.log()


def test_an_unknown_model_is_a_404_that_lists_the_models(make_service: MakeService) -> None:
    svc = make_service(two_models())
    r = httpx.post(f"{svc.url}/chat/stream", json={"message": "Hi", "model": "nope"}, timeout=10)
    assert r.status_code == 404 and r.json()["available"] == ["gemma", "small"] and "nope" in r.json()["error"]
    r = httpx.post(f"{svc.url}/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "Hi"}]},
                   timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{svc.url}/models/load", json={"model": "nope"}, timeout=10)
    assert r.status_code == 404
    r = httpx.post(f"{svc.url}/chat/stream", json={"message": "Hi", "model": "small", "keep_alive": "soon"}, timeout=10)
    assert r.status_code == 400 and "keep_alive" in r.json()["error"]
    assert models(svc)["small"]["state"] == "unloaded"  # nothing was loaded for any of them


def test_the_models_command_lists_loads_and_unloads(make_service: MakeService) -> None:
    svc = make_service(two_models())

    def edison_models(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edison", "models", *args, "--url", svc.url],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    listed = edison_models("list")
    assert listed.returncode == 0 and "gemma (default)" in listed.stdout and "unloaded" in listed.stdout
    loaded = edison_models("load", "small")
    assert loaded.returncode == 0 and loaded.stdout.startswith("small: ready"), loaded
    pid = models(svc)["small"]["workers"][0]
    assert edison_models("unload", "small").stdout.strip() == "small: unloaded"
    assert gone(pid)
    missing = edison_models("load", "nope")
    assert missing.returncode == 1 and "unknown model" in missing.stderr


def test_a_bad_models_table_stops_start_up_naming_the_key(make_service: MakeService, tmp_path: Any) -> None:
    from tests.support import write_config

    config = two_models()
    config["models"]["small"]["n_ctx"] = 10
    path = write_config(tmp_path / "bad.toml", config)
    run = subprocess.run([sys.executable, "-m", "edison", "serve", "--config", str(path), "--port", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "models.small.n_ctx" in run.stderr, run.stderr


def test_a_model_that_cannot_load_fails_its_request_and_is_tried_again_later(make_service: MakeService, tmp_path: Any) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)  # a GGUF header with nothing behind it
    config = two_models(restart_budget=1, restart_backoff_s=0.0)
    config["models"]["broken"] = {"path": str(broken), **ONE}
    svc = make_service(config)
    for _ in range(2):  # each request tries a fresh load, and hears why it failed
        stream = count(svc, "broken")
        assert stream.wait_for("progress", timeout=10).data["phase"] == "loading"
        done = stream.done.data
        assert done["ok"] is False and "could be started" in done["error"], done
        wait_state(svc, "broken", "unloaded", within=5)
    assert count(svc).done.data["ok"]  # the others are untouched


def test_the_least_recently_used_model_goes_first_not_the_oldest_load(make_service: MakeService) -> None:
    config = two_models(max_loaded_models=2)
    config["models"]["other"] = {"path": "smollm2-135m", **ONE}  # a third model (the same file will do)
    svc = make_service(config)
    assert count(svc, "small", mode="chat").done.data["ok"]  # loaded: gemma (first), small
    assert count(svc).done.data["ok"]  # gemma used again: small is now the least recently used
    small_pid = models(svc)["small"]["workers"][0]
    assert count(svc, "other", mode="chat").done.data["ok"]
    wait_gone(small_pid, within=5)
    assert {n: m["state"] for n, m in models(svc).items()} == {"gemma": "ready", "small": "unloaded", "other": "ready"}

"""Several models on one box (issue #23): what a load costs the request that waits for it, what a
switch between two models costs under a limit of one loaded model, how fast a request waiting for
a load stops, and what an unload gives back. The two bundled models (SmolLM2 135M Instruct and
Gemma 3 270M), 2 threads, 4 slots of 8,192 tokens each, on every system:

- cold: a fresh service with both models configured and none loaded, one request naming a model:
  request sent -> its first token, and the load time the service reports.
- switch: a limit of one loaded model, requests alternating A, B, A, B ...: per switch, request sent
  -> first token, then the same model once more (warm). Edison and llama-server in router mode
  (`--models-max 1`, a preset INI) run side by side, interleaved switch by switch.
- cancel: a request waiting for its model's load is cancelled, or its client hangs up: cancel ->
  `done`, and cancel -> the loading worker process gone (and the model's state after). llama-server
  has no cancel: its rows are disconnects only.
- memory: RSS and PSS of the service's every process (psutil, the whole process tree) before any
  load, after a load of A (and one reply), after A's unload; then the same for B.
- together: a limit of two, both models loaded and warm; a 64-token reply from each model alone,
  then from both at once: request sent -> last token, and tokens per second after the first.
  Each model's worker (child) has 2 threads for the 2 cores; Edison splits the cores while both
  compute (edison/pool/cpu.py), llama-server's children each keep theirs.

    python -m benchmarks.models [--trials 5] [--switches 10] [--cancels 12] [--together 5] [--json PATH]

Ollama is left out: it cannot be installed here without a network.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks import llama_server
from benchmarks.client import CpuProbe, SSEStream, alive, kill_pid, wait_until
from benchmarks.run import edison_model, machine_info
from benchmarks.systems import Edison, System, http_json, openai_events
from benchmarks.workload import SAMPLING, counting
from edison.model import resolve_model_path
from edison.settings import ModelSettings

HERE = Path(__file__).resolve().parent
MODELS = ("smollm2-135m", "gemma3-270m")  # A and B
THREADS, N_CTX, SLOTS = 2, 8192, 4
SECTIONS = ("cold", "switch", "cancel", "memory", "together")
QUESTION = "Count from 1 to 20, separated by commas."  # both models answer it with text at once
REPLY_TOKENS = 16
LONG_QUESTION = "Count from 1 to 100, separated by commas."  # a reply longer than TOGETHER_TOKENS
TOGETHER_TOKENS = 64


def model_path(name: str) -> str:
    return str(resolve_model_path(ModelSettings(path=name)))


def tree(root: int) -> list[psutil.Process]:
    """The service's process and every descendant (workers, llama-server's children, trackers)."""
    try:
        top = psutil.Process(root)
        return [top, *top.children(recursive=True)]
    except psutil.Error:
        return []


def role(process: psutil.Process) -> str:
    """What a process of the tree is: a model process (and which), a helper, or the server."""
    try:
        argv = process.cmdline()
    except psutil.Error:
        return "gone"
    text = " ".join(argv)
    if "--alias" in argv:
        return f"child {argv[argv.index('--alias') + 1]}"  # llama-server's server for one model
    if "resource_tracker" in text:
        return "resource tracker"
    if "spawn_main" in text or "--multiprocessing-fork" in text:
        return "worker"
    return "server"


def tree_memory(root: int) -> dict[str, Any]:
    rows = []
    for process in tree(root):
        try:
            info = process.memory_full_info()
        except psutil.Error:
            continue
        rows.append({"pid": process.pid, "role": role(process), "rss": info.rss, "pss": info.pss, "uss": info.uss})
    return {**{k: sum(r[k] for r in rows) for k in ("rss", "pss", "uss")}, "processes": rows}


class PidWatch:
    """When a process is gone (or a zombie), polled every 2 ms on a thread. Not CpuProbe.gone_at:
    that one also fires when one of the process's threads exits between two reads of /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.gone_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bench-watch-{pid}", daemon=True)

    def __enter__(self) -> PidWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        while not self._stop.is_set():
            if not alive(self.pid):
                self.gone_at = time.monotonic()
                return
            self._stop.wait(0.002)


class ModelService:
    """What the measurements ask of a multi-model server, on top of `System`."""

    process: Any
    port: int

    def chat(self, model: str, message: str, max_tokens: int) -> SSEStream:
        raise NotImplementedError

    def states(self) -> dict[str, str]:
        """Model name -> unloaded, loading or ready."""
        raise NotImplementedError

    def unload(self, model: str) -> Any:
        raise NotImplementedError

    def load_time(self, model: str) -> float | None:
        return None

    def open_long(self, model: str, message: str) -> SSEStream:
        """A request with a long reply, to stop."""
        return self.chat(model, message, 2048)

    def model_pids(self) -> dict[int, str]:
        """The processes that hold a model (Edison's workers, llama-server's children)."""
        return {p.pid: r for p in tree(self.process.pid) if (r := role(p)).startswith(("worker", "child"))}


class EdisonModels(ModelService, Edison):
    """Edison with both bundled models as `[models.*]` tables, none loaded at start (each loads on
    its first request and never unloads by idleness: `keep_alive_s = -1`), `[pool]
    max_loaded_models = limit`. The other settings are Edison's, as in every benchmark here."""

    def __init__(self, workdir: Path, limit: int = 1) -> None:
        super().__init__(edison_model(model_path(MODELS[0]), THREADS, {}), THREADS, workdir, workers=1,
                         slots=SLOTS, pool={"max_loaded_models": limit})
        self.limit = limit
        self.config_path = workdir / f"edison-models-max{limit}.toml"

    @property
    def label(self) -> str:
        return "edison"

    def config(self) -> str:
        tables = "".join(f"\n[models.{name}]\npath = {json.dumps(name)}\nn_ctx = {N_CTX}\nthreads = {THREADS}\n"
                         f"slots = {SLOTS}\nkeep_alive_s = -1\n" for name in MODELS)
        return f'default_model = "{MODELS[0]}"\n' + super().config() + tables

    def is_ready(self) -> bool:
        return http_json(self.port, "GET", "/models", timeout=2)[0] == 200

    def chat(self, model: str, message: str, max_tokens: int) -> SSEStream:
        body = {"model": model, "messages": [{"role": "user", "content": message}], "max_tokens": max_tokens,
                "stream": True, **{k: SAMPLING[k] for k in ("temperature", "top_p", "seed")}}
        return SSEStream(self.port, "/v1/chat/completions", body, translate=openai_events)

    def open_long(self, model: str, message: str) -> SSEStream:
        """Edison's own stream (init, progress, token, done), which a cancel ends with `done`."""
        return SSEStream(self.port, "/chat/stream", {"message": message, "mode": "n2048", "model": model})

    def models(self) -> list[dict[str, Any]]:
        return http_json(self.port, "GET", "/models")[1]["models"]

    def states(self) -> dict[str, str]:
        return {m["name"]: m["state"] for m in self.models()}

    def load_time(self, model: str) -> float | None:
        return next(m.get("load_time_s") for m in self.models() if m["name"] == model)

    def unload(self, model: str) -> Any:
        return http_json(self.port, "POST", "/models/unload", {"model": model}, timeout=60)

    def stop(self, grace: float = 10.0) -> None:
        if self.process and self.process.alive():
            self.worker_pids |= set(self.model_pids())  # to be sure they are gone afterwards
        super().stop(grace)


class LlamaRouter(ModelService, System):
    """llama-server in router mode: a preset INI names both models (each child: `-c 32768 -np 4`,
    the 4 slots of 8,192 tokens Edison has, 2 threads), `--models-max 1`. `quick` turns off the
    child's warm-up decode and its `--fit` memory probing, its fastest load; otherwise its defaults."""

    name = "llama-server router"
    can_cancel = False

    def __init__(self, workdir: Path, limit: int = 1, quick: bool = False) -> None:
        super().__init__(ModelSettings(path=model_path(MODELS[0])), THREADS, workdir)
        self.limit, self.quick = limit, quick
        self.preset_path = workdir / f"llama-router{'-quick' if quick else ''}.ini"
        self.child_pids: set[int] = set()

    @property
    def label(self) -> str:
        return f"{self.name}{' (no warm-up, fit off)' if self.quick else ''}"

    def preset(self) -> str:
        extra = "fit = off\nwarmup = false\n" if self.quick else ""
        return "version = 1\n" + "".join(
            f"\n[{name}]\nmodel = {model_path(name)}\nc = {N_CTX * SLOTS}\nparallel = {SLOTS}\n"
            f"threads = {THREADS}\nthreads-batch = {THREADS}\n{extra}" for name in MODELS)

    def argv(self) -> list[str]:
        return [str(llama_server.binary_path()), "--models-preset", str(self.preset_path), "--models-max",
                str(self.limit), "--no-ui", "--host", "127.0.0.1", "--port", str(self.port)]

    def launch(self) -> None:
        llama_server.ensure_built(self.workdir / "llama-server-build.log")
        self.preset_path.write_text(self.preset())
        super().launch()

    def is_ready(self) -> bool:
        return http_json(self.port, "GET", "/models", timeout=2)[0] == 200

    def chat(self, model: str, message: str, max_tokens: int) -> SSEStream:
        body = {**self.chat_body([{"role": "user", "content": message}], max_tokens), "model": model}
        body.pop("stream_options")
        return SSEStream(self.port, "/v1/chat/completions", body, translate=openai_events)

    def states(self) -> dict[str, str]:
        data = http_json(self.port, "GET", "/models")[1]["data"]
        named = {"loaded": "ready"}
        return {m["id"]: named.get(m["status"]["value"], m["status"]["value"]) for m in data}

    def unload(self, model: str) -> Any:
        return http_json(self.port, "POST", "/models/unload", {"model": model}, timeout=60)

    def load_time(self, model: str) -> float | None:
        """From the model's last child's log lines: its start to its "model loaded" (M.SS.mmm.uuu)."""
        assert self.process
        log = self.process.log_path.read_text(errors="replace")
        ports = re.findall(rf"spawning server instance with name={re.escape(model)} on port (\d+)", log)
        loaded = r"\] (\d+)\.(\d+)\.(\d+)\.(\d+) I srv +llama_server: model loaded"
        stamps = ports and re.findall(rf"\[{ports[-1]}{loaded}", log)
        if not stamps:
            return None
        minutes, seconds, millis, micros = map(int, stamps[-1])
        return minutes * 60 + seconds + millis / 1e3 + micros / 1e6

    def stop(self, grace: float = 10.0) -> None:
        if self.process and self.process.alive():
            self.child_pids |= set(self.model_pids())
        super().stop(grace)
        for pid in self.child_pids:
            kill_pid(pid)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "preset": self.preset()}


Factory = Callable[..., "EdisonModels | LlamaRouter"]  # (workdir, limit=1)
FACTORIES: dict[str, Factory] = {
    "edison": lambda w, limit=1: EdisonModels(w, limit),
    "llama-server": lambda w, limit=1: LlamaRouter(w, limit),
    "llama-server-quick": lambda w, limit=1: LlamaRouter(w, limit, quick=True),
}

_running: list[System] = []  # stopped at exit, whatever happened
_described: dict[str, Any] = {}  # label -> argv, config or preset, for the JSON


def start(service: EdisonModels | LlamaRouter) -> EdisonModels | LlamaRouter:
    _running.append(service)
    _described.setdefault(service.label, service.describe())
    service.launch()
    service.wait_ready()
    return service


def stop(service: EdisonModels | LlamaRouter) -> None:
    service.stop()
    if service in _running:
        _running.remove(service)


atexit.register(lambda: [s.stop(grace=2) for s in list(_running)])


def ask(service: ModelService, model: str, message: str = QUESTION, timeout: float = 180) -> dict[str, Any]:
    """One streamed reply; request sent -> its first token."""
    stream = service.chat(model, message, REPLY_TOKENS)
    try:
        stream.closed.wait(timeout)
        token, failure = stream.first("token"), stream.first("http_error")
        done = stream.first("done")
        error = (failure and failure.data) or (done and not done.data.get("ok") and done.data) or stream.error
        return {"model": model, "first_token_s": token.at - stream.sent_at if token else None,
                "tokens": stream.count("token"), "ok": token is not None and not error,
                "error": str(error) if error else None}
    finally:
        stream.close()


def unload_all(service: ModelService) -> list[str]:
    loaded = [name for name, state in service.states().items() if state != "unloaded"]
    for name in loaded:
        service.unload(name)  # Edison's answers once the workers are gone; llama-server's at once
    wait_until(lambda: not service.model_pids(), timeout=30)
    return loaded


def cold(names: list[str], workdir: Path, trials: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """A fresh service per trial, both models configured, none loaded: the first request's wait."""
    rows = []
    for trial in range(trials):
        for model in MODELS:
            for name in names:
                service = start(FACTORIES[name](workdir))
                try:
                    loaded_at_start = unload_all(service)
                    row = {"system": service.label, "trial": trial, **ask(service, model),
                           "load_time_s": service.load_time(model), "loaded_at_start": loaded_at_start,
                           "states_after": service.states(), "loadavg": os.getloadavg()[0]}
                finally:
                    stop(service)
                rows.append(row)
                log(f"cold {row['system']} {model}: {fmt(row['first_token_s'])}")
    return rows


def switching(names: list[str], workdir: Path, switches: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One service per system with a limit of one model, requests alternating between the models;
    the systems take turns, switch by switch."""
    services = []
    try:
        for name in names:
            services.append(start(FACTORIES[name](workdir)))
        rows = []
        for step in range(switches + 1):
            model = MODELS[step % 2]
            for service in services:
                row = {"system": service.label, "switch": step, "from": MODELS[(step + 1) % 2] if step else None,
                       **ask(service, model)}
                row["warm_first_token_s"] = ask(service, model)["first_token_s"]
                row.update(load_time_s=service.load_time(model), states=service.states(),
                           model_processes=sorted(service.model_pids().values()), loadavg=os.getloadavg()[0])
                rows.append(row)
                log(f"switch {step} {row['system']} -> {model}: {fmt(row['first_token_s'])}")
        return rows
    finally:
        for service in services:
            stop(service)


def cancel_during_load(names: list[str], workdir: Path, trials: int, cold_rows: list[dict[str, Any]],
                       rng: random.Random, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """A request waiting for its model's load, stopped at a random moment within the first 70 % of
    that model's cold first-token time on that system (from the cold section): a stop that comes
    after the load finished anyway is kept, with the state it found (`at_cancel`), and left out
    of the load rows of the summary. Edison: cancels and disconnects in turn. llama-server's
    router (which has no cancel): disconnects, half as many."""
    rows = []
    for name in [n for n in names if n in ("edison", "llama-server")]:
        service = start(FACTORIES[name](workdir))
        waits = {m: statistics.median([r["first_token_s"] for r in cold_rows if r["system"] == service.label
                                       and r["model"] == m and r["first_token_s"]] or [1.0]) for m in MODELS}
        try:
            hows = ("cancel", "disconnect") if isinstance(service, EdisonModels) else ("disconnect",)
            for trial in range(trials if len(hows) == 2 else max(1, trials // 2)):
                model, how = MODELS[(trial // len(hows)) % 2], hows[trial % len(hows)]
                row = {"system": service.label, "trial": trial,
                       **stop_load(service, model, how, rng.uniform(0.05, 0.7 * waits[model]))}
                rows.append(row)
                log(f"{how} during load {service.label} {model}: done {fmt(row['cancel_to_done_s'])}, model process "
                    f"gone {fmt(row['cancel_to_worker_gone_s'])}, then {row['state_after']}")
            rows.append({"system": service.label, "trial": "after", **ask(service, MODELS[1])})  # still answers
        finally:
            stop(service)
    return rows


def stop_load(service: EdisonModels | LlamaRouter, model: str, how: str, delay: float) -> dict[str, Any]:
    """One request for an unloaded model, cancelled or hung up on `delay` seconds after it was sent;
    then how long until `done`, until the model's process is gone, and the model's state after."""
    unload_all(service)  # a load that finished before the last stop stays loaded (no idle unload here)
    stream = service.open_long(model, counting(random.Random(delay)))
    try:
        if not wait_until(lambda: bool(service.model_pids()), timeout=10, interval=0.002):
            raise RuntimeError(f"no model process started for {model}: {stream.names()}")
        [worker] = service.model_pids()
        time.sleep(max(0.0, stream.sent_at + delay - time.monotonic()))
        with CpuProbe(worker, interval=0.002) as probe, PidWatch(worker) as watch:
            before = {"tokens": stream.count("token"), "progress": stream.count("progress"),
                      "state": service.states()[model]}
            at = time.monotonic()
            answer = service.cancel(stream) if how == "cancel" else stream.disconnect() and None
            # Until the process is gone, or the load finished anyway (then it stays: no point waiting).
            wait_until(lambda: watch.gone_at is not None or service.states()[model] == "ready", 15, 0.005)
            idle = probe.idle_after(at, timeout=30)  # a model that loaded anyway may compute the reply
        done = stream.wait_for("done", 10) if how == "cancel" else None
        settled = wait_until(lambda: service.states()[model] in ("unloaded", "ready"), timeout=15, interval=0.01)
        return {"model": model, "how": how, "delay_s": delay, "at_cancel": before, "cancel_answer": answer,
                "cancel_to_done_s": done.at - at if done else None, "done": done.data if done else None,
                "cancel_to_worker_gone_s": watch.gone_at - at if watch.gone_at else None,
                "cancel_to_idle_s": idle, "idle_capped_at_s": 30 if idle is None else None,
                "worker": worker, "worker_alive_after": alive(worker), "state_after": service.states()[model],
                "settled_within_15s": settled, "loadavg": os.getloadavg()[0]}
    finally:
        stream.close()


def memory(names: list[str], workdir: Path, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Per system: the whole tree as started (Edison loads its default model at start-up), with no
    model loaded (the base), after a load of each model in turn (and one reply), and after its
    unload (the model process gone, then 1 s to settle)."""
    rows = []
    for name in names:
        service = start(FACTORIES[name](workdir))
        try:
            wait_until(lambda: "loading" not in service.states().values(), timeout=120)
            samples = [{"step": "as started", "states": service.states(), **tree_memory(service.process.pid)}]
            unload_all(service)
            time.sleep(1.0)
            samples.append({"step": "no model loaded", **tree_memory(service.process.pid)})
            for model in MODELS:
                reply = ask(service, model)
                samples.append({"step": f"{model} loaded", "reply_ok": reply["ok"], **tree_memory(service.process.pid),
                                "listing": http_json(service.port, "GET", "/models")[1]})  # Edison's estimate_mib
                at = time.monotonic()
                status, answer = service.unload(model)
                answered = time.monotonic() - at
                gone = wait_until(lambda: not service.model_pids(), timeout=30, interval=0.005)
                unload_s = time.monotonic() - at
                time.sleep(1.0)
                samples.append({"step": f"{model} unloaded", "unload_status": status, "unload_answer": answer,
                                "unload_answered_s": answered, "unload_to_gone_s": unload_s,
                                "model_processes_gone": gone, **tree_memory(service.process.pid)})
            rows.append({"system": service.label, "samples": samples})
            base = samples[1]["pss"]
            log(f"memory {service.label}: PSS " + ", ".join(f"{s['step']} {s['pss'] / 2**20:.0f}" for s in samples)
                + f" MiB (after last unload {100 * (samples[-1]['pss'] / base - 1):+.1f} %)")
        finally:
            stop(service)
    return rows


def together(names: list[str], workdir: Path, rounds: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Both models loaded, each asked alone, then both at once; the systems one after the other."""
    rows = []
    for name in names:
        service = start(FACTORIES[name](workdir, limit=2))
        try:
            for model in MODELS:
                ask(service, model)  # loaded and warm
            for trial in range(rounds):
                for at_once, asked in [(False, [m]) for m in MODELS] + [(True, list(MODELS))]:
                    for row in replies(service, asked):
                        rows.append({"system": service.label, "trial": trial, "together": at_once, **row,
                                     "loadavg": os.getloadavg()[0]})
                        log(f"together={at_once} {service.label} {row['model']}: last token "
                            f"{fmt(row['last_token_s'])}, {row['tokens_per_s'] or 0:.1f} tok/s")
        finally:
            stop(service)
    return rows


def replies(service: ModelService, models: list[str], timeout: float = 300) -> list[dict[str, Any]]:
    """A TOGETHER_TOKENS reply from each model, all sent at once."""
    streams = [(model, service.chat(model, LONG_QUESTION, TOGETHER_TOKENS)) for model in models]
    try:
        rows = []
        for model, stream in streams:
            stream.closed.wait(timeout)
            at = [e.at for e in stream.events if e.name == "token"]
            rows.append({"model": model, "tokens": len(at), "ok": bool(at) and stream.error is None,
                         "last_token_s": at[-1] - stream.sent_at if at else None,
                         "tokens_per_s": (len(at) - 1) / (at[-1] - at[0]) if len(at) > 1 and at[-1] > at[0] else None})
        return rows
    finally:
        for _, stream in streams:
            stream.close()


def fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def meta() -> dict[str, Any]:
    info = machine_info(edison_model(model_path(MODELS[0]), THREADS, {}), THREADS, {})
    for key in ("model", "model_path", "model_bytes", "edison_model_settings"):
        info.pop(key, None)
    version = subprocess.run([str(llama_server.binary_path()), "--version"], capture_output=True, text=True)
    info.update(models={m: {"file": Path(model_path(m)).name, "bytes": Path(model_path(m)).stat().st_size}
                        for m in MODELS},
                n_ctx_per_slot=N_CTX, slots=SLOTS, reply_tokens=REPLY_TOKENS,
                llama_server=(version.stdout + version.stderr).strip().splitlines()[0],
                ollama="not measured: it cannot be installed here without a network")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="cold loads per model per system")
    parser.add_argument("--switches", type=int, default=10, help="switches per system (after one first load)")
    parser.add_argument("--cancels", type=int, default=12, help="cancels during a load (half of them disconnects)")
    parser.add_argument("--together", type=int, default=5, help="rounds of both models at once (and each alone)")
    parser.add_argument("--systems", default=",".join(FACTORIES), help="comma-separated, from: %(default)s")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections, from: %(default)s")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--json", type=Path, default=HERE / "results-models.json")
    args = parser.parse_args(argv)
    names, sections = args.systems.split(","), args.only.split(",")
    for signum in (signal.SIGTERM, signal.SIGHUP):  # SystemExit: every `finally` stops what it started
        signal.signal(signum, lambda n, _f: sys.exit(128 + n))
    started, info = time.monotonic(), meta()
    results: dict[str, Any] = {"meta": info, "args": {k: str(v) for k, v in vars(args).items()}, "errors": []}

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    def section(key: str, run: Callable[[], Any]) -> None:
        if key not in sections:
            return
        try:
            results[key] = run()
        except Exception as exc:  # noqa: BLE001 - recorded; the other sections still run
            results["errors"].append({"section": key, "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()})
            log(f"{key} failed: {exc}")

    with tempfile.TemporaryDirectory(prefix="edison-models-") as tmp:
        workdir = Path(tmp)
        try:
            section("cold", lambda: cold(names, workdir, args.trials, log))
            section("switch", lambda: switching(names, workdir, args.switches, log))
            section("cancel", lambda: cancel_during_load(names, workdir, args.cancels, results.get("cold", []),
                                                         random.Random(args.seed), log))
            section("memory", lambda: memory(names, workdir, log))
            section("together", lambda: together(names, workdir, args.together, log))
        finally:
            for service in list(_running):
                stop(service)
            logs = {p.name: p.read_text(errors="replace")[-4000:] for p in workdir.glob("*.log")}
            if results["errors"]:
                results["log_tails"] = logs
    info.update(loadavg_end=" ".join(f"{x:.2f}" for x in os.getloadavg()),
                duration_s=round(time.monotonic() - started, 1), finished=datetime.now().strftime("%Y-%m-%d %H:%M"))
    results["systems"] = _described
    args.json.write_text(json.dumps(results, indent=1, default=str))
    print(summary(results))
    print(f"JSON: {args.json}")
    return 1 if results["errors"] else 0


def stats(values: list[float | None]) -> str:
    found = [v for v in values if v is not None]
    if not found:
        return "n 0"
    return f"n {len(found)}  p50 {fmt(statistics.median(found))}  min {fmt(min(found))}  max {fmt(max(found))}"


def summary(results: dict[str, Any]) -> str:
    lines = []
    for row_key, title in (("cold", "cold load -> first token"), ("switch", "switch -> first token")):
        rows = [r for r in results.get(row_key, []) if r.get("from") or row_key == "cold"]
        for system in dict.fromkeys(r["system"] for r in rows):
            for model in MODELS:
                mine = [r for r in rows if r["system"] == system and r["model"] == model]
                lines.append(f"{title:<26} {system:<40} {model:<13} {stats([r['first_token_s'] for r in mine])}")
    stops = [r for r in results.get("cancel", []) if r.get("how") and r["at_cancel"]["state"] == "loading"]
    late = [r for r in results.get("cancel", []) if r.get("how") and r["at_cancel"]["state"] != "loading"]
    if late:
        lines.append(f"stops that came after the load had finished (left out below): {len(late)}")
    for system, how in dict.fromkeys((r["system"], r["how"]) for r in stops):
        rows = [r for r in stops if r["system"] == system and r["how"] == how]
        states = ", ".join(f"{k} {v}" for k, v in Counter(r["state_after"] for r in rows).items())
        if how == "cancel":
            lines.append(f"{how} during load -> done {system:<29} {stats([r['cancel_to_done_s'] for r in rows])}")
        lines.append(f"{how} during load -> model process gone {system:<19} "
                     f"{stats([r['cancel_to_worker_gone_s'] for r in rows])}  (then: {states})")
        lines.append(f"{how} during load -> model process idle {system:<19} "
                     f"{stats([r['cancel_to_idle_s'] for r in rows])}")
    for row in results.get("memory", []):
        base = row["samples"][1]
        for s in row["samples"]:
            change = (f" ({100 * (s['pss'] / base['pss'] - 1):+.1f} %; unload -> process gone "
                      f"{fmt(s['unload_to_gone_s'])})" if s["step"].endswith(" unloaded") else "")
            lines.append(f"memory {row['system']:<40} {s['step']:<22} RSS {s['rss'] / 2**20:7.1f} MiB  PSS "
                         f"{s['pss'] / 2**20:7.1f} MiB{change}")
    rows = results.get("together", [])
    for system in dict.fromkeys(r["system"] for r in rows):
        for model in MODELS:
            for at_once in (False, True):
                mine = [r for r in rows if r["system"] == system and r["model"] == model and r["together"] is at_once]
                rates = [r["tokens_per_s"] for r in mine if r["tokens_per_s"]]
                lines.append(f"{'both at once' if at_once else 'alone':<12} -> last token {system:<28} {model:<13} "
                             f"{stats([r['last_token_s'] for r in mine])}  tok/s p50 "
                             f"{statistics.median(rates) if rates else 0:.1f}")
    lines += [f"ERROR {e['section']}: {e['error']}" for e in results["errors"]]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

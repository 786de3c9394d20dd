"""`python -m benchmarks`: runs every section in order, with progress on stderr, then prints
one table and writes the JSON (raw samples, machine info) and the chart to benchmarks/results/.

Sections, in order: throughput (decode speed and the prefill of a ~6,000-token prompt) and
memory of the head-to-head systems (they also warm them up), stop during decode, stop during
prefill (the headline), recovery (a short request right after an abandoned long one), wedged
workers, Edison's memory with 1/2/4 workers, Edison under load, concurrency (many clients
at once on each system, one stop among busy slots, memory per slot: benchmarks/concurrency.py),
and conversations (chats that come back, a worker killed and a service restarted under a long
chat: benchmarks/conversations.py).
The head-to-head systems are measured interleaved, trial by trial, so that contention from
other work on the machine hits them alike.

Every process is started by this module's caller thread and stopped in a `finally`, even
when a section fails; a failed trial is recorded with its error, its system is restarted,
and the run goes on (and exits 1 at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

from benchmarks import BENCH_MODEL
from benchmarks import concurrency, conversations, llama_server, report, scenarios
from benchmarks.plan import FULL, QUICK, Plan
from benchmarks.systems import SYSTEMS, Edison, InProcess, System
from benchmarks.workload import long_message
from edison.settings import DEFAULT_CONFIG, ModelSettings, load_settings

HERE = Path(__file__).resolve().parent
SECTIONS = ("throughput", "decode", "prefill", "recovery", "wedge", "memory", "load", "concurrency", "conversations")
HEAD_TO_HEAD = ("throughput", "decode", "prefill", "recovery", "wedge", "memory")  # on the --systems, all started at once


class Progress:
    """A plain progress bar on stderr (one line per step when stderr is not a terminal)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.start = max(1, total), 0, time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        self.done = min(self.total, self.done + 1)
        self.show(label)

    def show(self, label: str) -> None:
        filled = int(30 * self.done / self.total)
        elapsed = int(time.monotonic() - self.start)
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {elapsed // 60}m{elapsed % 60:02d}s {label}"
        sys.stderr.write(f"\r{line[:110]:<110}" if self.tty else line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class Run:
    def __init__(self, plan: Plan, args: argparse.Namespace, model: ModelSettings, workdir: Path) -> None:
        self.plan, self.args, self.model, self.workdir = plan, args, model, workdir
        self.threads: int = args.threads
        self.rng = random.Random(args.seed)
        self.trials: dict[str, Any] = {
            s: [] for s in ("throughput", "prefill_speed", "memory", "stop", "recovery", "wedge", "load",
                            "concurrency", "slot_stop", "slot_memory", "conversations", "conversation_kill",
                            "conversation_restart")
        }
        self.trials["lag"] = {"idle": [], "loaded": []}
        self.errors: list[dict[str, Any]] = []
        self.started: list[System | InProcess] = []
        self.described: list[dict[str, Any]] = []
        self.head_to_head: list[str] = []
        self.progress = Progress(self.total_steps())

    def wants(self, section: str) -> bool:
        return section in self.args.only

    def total_steps(self) -> int:
        p, n = self.plan, len(self.args.systems)
        baselines = sum(2 if SYSTEMS[s].can_cancel else 1 for s in self.args.systems if s != "edison")
        counts = {
            "throughput": (p.throughput_runs + p.prefill_runs) * (n + 1),
            "decode": p.decode_trials * sum(2 if SYSTEMS[s].can_cancel else 1 for s in self.args.systems),
            "prefill": p.prefill_trials + p.prefill_disconnect_trials + p.baseline_prefill_trials * baselines,
            "recovery": p.recovery_trials + p.baseline_recovery_trials * (n - 1),
            "wedge": 2 * p.wedge_trials,
            "memory": len(p.memory_workers) + 1,
            "load": p.load_trials + 1,
            "concurrency": concurrency.steps(p, 2 + 2 * ("llama-server" in self.args.systems)
                                             + ("llama-cpp-server" in self.args.systems)),
            "conversations": conversations.steps(p, 1 + ("llama-server" in self.args.systems)
                                                 + ("llama-cpp-server" in self.args.systems)),
        }
        return any(self.wants(s) for s in HEAD_TO_HEAD) + sum(v for k, v in counts.items() if self.wants(k))

    # Processes.

    def start(self, *targets: System | InProcess) -> None:
        for target in targets:  # launch all, then wait: they load their models in parallel
            self.started.append(target)
            target.launch()
        for target in targets:
            target.wait_ready()

    def stop(self, *targets: System | InProcess) -> None:
        for target in targets:
            try:
                target.stop()
            finally:
                if target in self.started:
                    self.started.remove(target)

    def stop_all(self) -> None:
        while self.started:
            target = self.started.pop()
            try:
                target.stop(grace=3.0) if isinstance(target, System) else target.stop()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"benchmarks: could not stop {target.name}: {exc}", file=sys.stderr)

    def attempt(self, section: str, target: System | InProcess, fn: Callable[..., Any], *args: Any, **spec: Any) -> Any:
        """One trial; a failure is recorded, its system restarted, and the run goes on."""
        loadavg = round(os.getloadavg()[0], 2)
        try:
            record = fn(*args)
            if isinstance(record, dict):
                record["loadavg_1m"] = loadavg  # how busy the shared machine was
            return record
        except Exception as exc:  # noqa: BLE001 - reported in the table's notes and the exit code
            error = {"section": section, "system": target.label, **spec, "error": f"{type(exc).__name__}: {exc}"}
            self.errors.append(error)
            print(f"\nbenchmarks: {section} trial failed on {target.label}: {exc}", file=sys.stderr)
            if isinstance(target, System):
                target.restart()
            return error

    # Sections.

    def run(self) -> None:
        systems = [self._make(name) for name in self.args.systems]
        edison = next(s for s in systems if isinstance(s, Edison))
        inproc = InProcess(self.model, self.threads, self.workdir)
        self.described = [s.describe() for s in systems]
        self.head_to_head = [s.label for s in systems]
        if "llama-server" in self.args.systems and not llama_server.binary_path().exists():
            self.progress.show("building llama-server from llama-cpp-python's sdist (first time only, 10-15 min)")
            llama_server.ensure_built(self.workdir / "llama-server-build.log")
        if any(self.wants(s) for s in HEAD_TO_HEAD):
            self.head_to_head_sections(systems, edison, inproc)
        if self.wants("memory"):
            self.memory_scaling()
        if self.wants("load"):
            self.load()
        if self.wants("concurrency"):
            concurrency.section(self)
        if self.wants("conversations"):
            conversations.section(self)

    def head_to_head_sections(self, systems: list[System], edison: Edison, inproc: InProcess) -> None:
        self.progress.show("starting the head-to-head systems")
        self.start(*systems, inproc)
        self.progress.step("started")
        self.prompt_tokens = inproc.ask({"tokenize": long_message(random.Random(0))})["tokens"]
        if self.wants("throughput"):
            self.throughput([*systems, inproc])
            self.prefill_speed([*systems, inproc])
        if self.wants("memory"):
            self.snapshot_memory([*systems, inproc])
        self.stop(inproc)
        if self.wants("decode"):
            self.stop_trials(systems, "decode")
        if self.wants("prefill"):
            self.stop_trials(systems, "prefill")
        if self.wants("recovery"):
            self.recovery(systems)
        if self.wants("wedge"):
            self.wedge(edison)
        self.stop(*systems)

    def _make(self, name: str) -> System:
        return SYSTEMS[name](self.model, self.threads, self.workdir)

    def throughput(self, targets: list[System | InProcess]) -> None:
        for i in range(self.plan.throughput_runs):
            for target in targets:
                self.progress.step(f"throughput: {target.label} {i + 1}/{self.plan.throughput_runs}")
                record = self.attempt("throughput", target, scenarios.throughput_run, target, self.rng,
                                      self.plan.throughput_tokens)
                self.trials["throughput"].append(record)

    def prefill_speed(self, targets: list[System | InProcess]) -> None:
        """Every round in fresh processes: one process's prefill speed is steady, but it differs
        from the next one's by up to ~5% (seen here), so each round samples new ones."""
        p, inproc = self.plan, next(t for t in targets if isinstance(t, InProcess))
        # For the systems that do not report a prompt's length (they all get the same text).
        known = inproc.ask({"tokenize": long_message(random.Random(0), p.prefill_tokens)})["tokens"]
        for i in range(p.prefill_runs):
            if i:
                self.progress.show("prefill speed: restarting every system")
                self.stop(*targets)
                self.start(*targets)
            for target in targets:
                self.progress.step(f"prefill speed: {target.label} {i + 1}/{p.prefill_runs}")
                record = self.attempt("prefill speed", target, scenarios.prefill_run, target, self.rng,
                                      p.prefill_tokens, known)
                self.trials["prefill_speed"].append(record)

    def snapshot_memory(self, targets: list[System | InProcess]) -> None:
        self.progress.step("memory of the head-to-head systems")
        for target in targets:
            self.trials["memory"] += scenarios.memory_snapshot(target.label, target.processes())

    def stop_trials(self, systems: list[System], phase: str) -> None:
        """Round-robin over (system, way), so the systems share whatever else the machine is doing."""
        p = self.plan
        queue: list[tuple[System, str, int]] = []
        for system in systems:
            for how in ("cancel", "disconnect") if system.can_cancel else ("disconnect",):
                if phase == "decode":
                    count = p.decode_trials
                elif isinstance(system, Edison):
                    count = p.prefill_trials if how == "cancel" else p.prefill_disconnect_trials
                else:
                    count = p.baseline_prefill_trials
                queue.append((system, how, count))
        for round_ in range(max(c for _, _, c in queue)):
            for system, how, count in queue:
                if round_ < count:
                    self._stop_trial(system, phase, how, round_, count)

    def _stop_trial(self, system: System, phase: str, how: str, round_: int, count: int) -> None:
        p = self.plan
        if phase == "decode":
            moment, cap = p.decode_tokens, 30.0
        elif isinstance(system, Edison):
            moment, cap = p.prefill_delay_s, 30.0
        else:
            moment = p.prefill_delay_s
            cap = p.full_cap_s if (p.baseline_full_run and round_ == 0) else p.baseline_cap_s
        wait = f" (waits up to {cap:.0f} s for it to stop)" if cap > 30 else ""
        self.progress.step(f"{phase} {how}: {system.label} {round_ + 1}/{count}{wait}")
        record = self.attempt(f"{phase} {how}", system, scenarios.stop_trial, system, phase, how, self.rng,
                              moment, cap, phase=phase, how=how)
        self.trials["stop"].append(record)
        if record.get("capped"):
            # Still computing: a restart is the only way to get it back before its prefill ends
            # (and to keep it from slowing down what is measured next).
            system.restart()

    def recovery(self, systems: list[System]) -> None:
        p = self.plan
        for round_ in range(max(p.recovery_trials, p.baseline_recovery_trials)):
            for system in systems:
                count = p.recovery_trials if isinstance(system, Edison) else p.baseline_recovery_trials
                if round_ >= count:
                    continue
                self.progress.step(f"recovery: {system.label} {round_ + 1}/{count}")
                record = self.attempt("recovery", system, scenarios.recovery_trial, system, self.rng,
                                      p.prefill_delay_s, p.recovery_cap_s)
                self.trials["recovery"].append(record)
                if record.get("capped"):
                    system.restart()  # still on the abandoned prompt: the only way to get it back

    def wedge(self, edison: Edison) -> None:
        for i in range(self.plan.wedge_trials):
            for kind in ("sigstop", "native"):
                self.progress.step(f"wedged worker ({kind}): {i + 1}/{self.plan.wedge_trials}")
                record = self.attempt("wedge", edison, scenarios.wedge_trial, edison, kind, self.rng, kind=kind)
                self.trials["wedge"].append(record)

    def memory_scaling(self) -> None:
        for workers in self.plan.memory_workers:  # 1 worker: the head-to-head Edison, measured earlier
            self.progress.step(f"memory: edison with {workers} workers")
            edison = Edison(self.model, max(1, self.threads // workers), self.workdir, workers=workers)
            try:
                self.start(edison)
                scenarios.warm_up(edison, workers, self.rng)
                self.trials["memory"] += scenarios.memory_snapshot(edison.label, edison.processes())
            except Exception as exc:  # noqa: BLE001
                self.errors.append({"section": "memory", "system": edison.label, "error": f"{type(exc).__name__}: {exc}"})
            finally:
                self.stop(edison)

    def load(self) -> None:
        p = self.plan
        self.progress.step("load: starting edison")
        edison = Edison(self.model, max(1, self.threads // p.load_workers), self.workdir,
                        workers=p.load_workers, queue_size=p.load_queue, slots=1)  # fills up, then queues
        self.described.append(edison.describe())
        try:
            self.start(edison)
            scenarios.warm_up(edison, p.load_workers, self.rng)
            with scenarios.LagProbe(edison.port) as lag:
                time.sleep(2.0)  # an idle baseline for the probe
                for i in range(p.load_trials):
                    self.progress.step(f"load: trial {i + 1}/{p.load_trials}")
                    record = self.attempt("load", edison, scenarios.load_trial, edison, lag, self.rng)
                    self.trials["load"].append(record)
                    time.sleep(0.5)
            for state, rtt in lag.samples:
                if state in self.trials["lag"]:
                    self.trials["lag"][state].append(rtt)
        finally:
            self.stop(edison)


def machine_info(model: ModelSettings, threads: int, overrides: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    versions = {}
    for name in ("starlette", "uvicorn", "psutil", "matplotlib", "edison"):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:  # noqa: BLE001
            versions[name] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True, text=True).stdout.strip()
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "llama_cpp_python": llama_cpp.__version__,
        "versions": versions,
        "git_commit": commit,
        "model": Path(model.path).name,
        "model_path": model.path,
        "model_bytes": Path(model.path).stat().st_size,
        "edison_model_settings": asdict(model),
        "overrides": overrides,
        "threads": threads,
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="Edison's stop-latency benchmarks.")
    parser.add_argument("--quick", action="store_true", help="a small subset of everything (about 5 minutes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads for every system (default: %(default)s)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated, from: %(default)s")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections, from: %(default)s")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the stop moments")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON, chart and logs go")
    parser.add_argument("--publish", action="store_true", help="also write benchmarks/RESULTS.md, its chart and RESULTS.json")
    parser.add_argument("--from-json", type=Path, help="measure nothing: report (and --publish) a saved run's JSON")
    parser.add_argument("--conversations", type=_counts, default=None, metavar="N,N",
                        help="the conversations section's chat counts, in place of the plan's (4,8,16), e.g. 1")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one of Edison's settings (as in config.toml), e.g. --set model.n_ubatch=512")
    args = parser.parse_args(argv)
    try:
        args.overrides = dict(_override(item) for item in args.set)
    except ValueError as exc:
        parser.error(str(exc))
    args.systems = [s for s in args.systems.split(",") if s]
    args.only = [s for s in args.only.split(",") if s]
    unknown = [s for s in args.systems if s not in SYSTEMS] + [s for s in args.only if s not in SECTIONS]
    if unknown or "edison" not in args.systems:
        parser.error(f"unknown systems or sections: {unknown}" if unknown else "--systems must include edison")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**31)
    return args


def _counts(text: str) -> tuple[int, ...]:
    counts = tuple(int(n) for n in text.split(",") if n)
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected chat counts >= 1, e.g. 1,4")
    return counts


def _override(item: str) -> tuple[str, Any]:
    """"model.n_ubatch=512" -> ("model.n_ubatch", 512): the value is read as TOML, else a string."""
    key, sep, value = item.partition("=")
    if not sep or "." not in key:
        raise ValueError(f"--set {item!r}: expected SECTION.KEY=VALUE")
    try:
        return key, tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return key, value


def edison_model(model_path: str, threads: int, overrides: dict[str, Any]) -> ModelSettings:
    """Edison's [model] settings as `make run` would use them (config.toml, then the overrides),
    for the bundled model, the run's thread count and the 8192-token context every system gets."""
    model = load_settings(DEFAULT_CONFIG, **overrides).model
    return replace(model, path=model_path, n_ctx=8192, threads=threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        return report_saved(args)
    plan = QUICK if args.quick else FULL
    if args.conversations:
        plan = replace(plan, conversation_counts=args.conversations)
    from edison.model import resolve_model_path

    model = edison_model(str(resolve_model_path(ModelSettings(path=BENCH_MODEL))), args.threads, args.overrides)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.out / f"logs-{stamp}"
    workdir.mkdir()
    meta = machine_info(model, args.threads, args.overrides)
    # SIGTERM/SIGHUP become SystemExit, so every `finally` below runs and stops what was started.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda n, _f: sys.exit(128 + n))
    run = Run(plan, args, model, workdir)
    started = time.monotonic()
    try:
        run.run()
    finally:
        run.stop_all()
        run.progress.close()
    meta.update(
        mode=plan.name, seed=args.seed, finished=datetime.now().strftime("%Y-%m-%d %H:%M"),
        duration_s=round(time.monotonic() - started, 1), prompt_tokens=getattr(run, "prompt_tokens", None),
        loadavg_end=" ".join(f"{x:.2f}" for x in os.getloadavg()), logs=str(workdir),
    )
    results = {"meta": meta, "plan": vars(plan), "systems": run.described, "head_to_head": run.head_to_head,
               "trials": run.trials, "errors": run.errors}
    json_path = args.out / f"bench-{plan.name}-{stamp}.json"
    report_run(results, args, json_path, write=True)
    print(f"Logs: {workdir}")
    return 1 if run.errors else 0


def report_run(results: dict[str, Any], args: argparse.Namespace, json_path: Path, write: bool) -> None:
    """Table on stdout; JSON and chart beside each other; RESULTS.md and its chart if --publish."""
    meta = results["meta"]
    rows = report.summarise(results)
    title = (f"Stop latency per phase, {meta['cpu_count']} CPUs, {meta['threads']} threads each "
             f"({meta['mode']} run, {meta['finished']})")
    png_path = json_path.with_suffix(".png")
    if write:
        report.write_json(json_path, results, rows)
        report.chart(png_path, results, title)
    print(report.table(rows))
    for error in results["errors"]:
        print(f"FAILED: {error}")
    print(f"\n{len(results['errors'])} failed trials. Raw samples: {json_path}\nChart: {png_path}")
    if args.publish:
        report.chart(HERE / "stop_latency.png", results, title)
        target = HERE / "RESULTS.md"
        previous = target.read_text() if target.exists() else ""
        target.write_text(report.results_markdown(results, rows, "stop_latency.png", previous))
        # The published run's raw samples beside it, committed with it (results/ is not).
        report.write_json(HERE / "RESULTS.json", results, rows)
        print(f"Published {target} and {HERE / 'RESULTS.json'}")


def report_saved(args: argparse.Namespace) -> int:
    results = json.loads(args.from_json.read_text())
    results.pop("summary", None)
    report_run(results, args, args.from_json, write=False)
    return 1 if results["errors"] else 0

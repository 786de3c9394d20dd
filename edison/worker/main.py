"""The worker process: load the model once, then receive -> generate -> send, forever.

No HTTP, no asyncio: this package imports llama_cpp and never starlette (tests/test_layers.py).
It reads its cancel flags from shared memory (written only by the parent), never from the
pipe, so a stop reaches it even in the middle of a native call. llama_cpp is imported inside
`main`, not at the top: the pool imports this module's `main` as the spawn target, and must not
load libllama into the web process by doing so.
"""

from __future__ import annotations

import ctypes
import faulthandler
import logging
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from edison.logging_setup import configure_logging
from edison.protocol import EXIT_LOAD_FAILED, EXIT_ORPHANED, Job, Ready
from edison.settings import Settings

PR_SET_PDEATHSIG = 1

logger = logging.getLogger("edison.worker")


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the thread that spawned it exits, even if the parent is SIGKILLed."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(EXIT_ORPHANED)


def main(
    jobs: Connection,
    results: Connection,
    flags: Any,  # multiprocessing RawArray('q'): "cancel every job id <= N", per worker and slot
    busy_workers: Any,  # multiprocessing RawValue('i'): workers computing now, every model's (pool/cpu.py)
    index: int,
    settings: Settings,
    model_path: str,
    parent_pid: int,
) -> None:
    die_with_parent(parent_pid)
    for name in [k for k in os.environ if k == "NOTIFY_SOCKET" or k.startswith("WATCHDOG_")]:
        del os.environ[name]  # only the service itself talks to systemd
    # Ctrl-C and SIGTERM are the parent's to handle: a terminal's Ctrl-C, `timeout`, a container
    # runtime or systemd without KillMode=mixed signal the whole process group, and a worker that
    # died of it first would look like a crash (and its streams would lose their `done`). The
    # service ends its workers itself: EOF on the job pipe, or SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # dumped before a kill
    if settings.server.log_format == "json":
        configure_logging(settings.server.log_level, "json")
    else:
        logging.basicConfig(
            level=settings.server.log_level.upper(),
            format=f"%(asctime)s %(levelname)s [worker {index} pid {os.getpid()}] %(message)s",
            stream=sys.stderr,
        )

    try:
        from edison.worker.engine import Engine, sleep_in_c  # here, not at the top: see the module docstring

        if settings.debug.load_wedge_s:
            sleep_in_c(settings.debug.load_wedge_s)  # a slow load, for tests: only the kill tier ends it
        engine = Engine(model_path, settings, flags, index * settings.pool.slots, busy_workers)
    except Exception as exc:
        logger.error("Model failed to load from %s: %s", model_path, exc)
        sys.exit(EXIT_LOAD_FAILED)

    packages = tuple(sorted({name.partition(".")[0] for name in sys.modules}))
    results.send(Ready(os.getpid(), os.path.basename(model_path), engine.n_ctx, engine.slots, packages,
                       engine.format.name))
    serve(engine, jobs, results)
    engine.close()  # the slots' KV states are saved, and written
    logging.shutdown()
    # Nothing left to keep: the kernel takes the model's memory back at once, where the
    # interpreter's own teardown (freeing the context, the model, every module) took ~100 ms of an
    # unload, and a switch between models waits for that exit.
    os._exit(0)


def serve(engine: Any, jobs: Connection, results: Connection) -> None:
    """Jobs join between steps; with nothing to decode, wait for the next one."""
    while True:
        try:
            while engine.idle or jobs.poll():
                job: Job = jobs.recv()
                engine.add(job, results.send)
        except (EOFError, OSError):
            return  # the pool closed our pipe: a clean shutdown
        engine.step(results.send)

"""The worker process: load the model once, then receive -> generate -> send, forever.

No HTTP, no asyncio. It reads its cancel flag from shared memory (written only by the
parent), never from the pipe, so a stop reaches it even in the middle of a native call.
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
from edison.messages import Job, Ready
from edison.settings import Settings

EXIT_LOAD_FAILED = 3  # the model could not load: the pool backs off instead of spinning
EXIT_ORPHANED = 4  # the parent was gone before the worker got going

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
    cancel_upto: Any,  # multiprocessing RawArray('q'): "cancel every job id <= N", per slot
    slot: int,
    settings: Settings,
    model_path: str,
    parent_pid: int,
) -> None:
    die_with_parent(parent_pid)
    for name in [k for k in os.environ if k == "NOTIFY_SOCKET" or k.startswith("WATCHDOG_")]:
        del os.environ[name]  # only the service itself talks to systemd
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)  # dumped before a kill
    if settings.server.log_format == "json":
        configure_logging(settings.server.log_level, "json")
    else:
        logging.basicConfig(
            level=settings.server.log_level.upper(),
            format=f"%(asctime)s %(levelname)s [worker {slot} pid {os.getpid()}] %(message)s",
            stream=sys.stderr,
        )

    try:
        from edison.engine import Engine

        engine = Engine(model_path, settings, lambda job_id: cancel_upto[slot] >= job_id)
    except Exception as exc:
        logger.error("Model failed to load from %s: %s", model_path, exc)
        sys.exit(EXIT_LOAD_FAILED)

    results.send(Ready(os.getpid(), os.path.basename(model_path), engine.n_ctx))
    while True:
        try:
            job: Job = jobs.recv()
        except (EOFError, OSError):
            return  # the pool closed our pipe: a clean shutdown
        engine.run(job, results.send)

"""Stopping a `llama_decode` mid-step: llama.cpp's abort callback, watching the cancel flags
of the sequences in the batch being decoded (and only those: a cancel of a sequence that is
waiting for its prefill turn must not abort the others' step).

The callback is the C function in `abort.c`, built with the package: ggml calls it after
every graph node, so it stays armed in every step, decode included, for the cost of a few
loads. Without the compiled piece (a source tree nobody built) a Python callback does the
same job, armed only for steps that read a prompt piece: through ctypes and the GIL it
costs ~10% of decode speed, and a decode step ends within tens of milliseconds anyway.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from typing import Any

import llama_cpp

logger = logging.getLogger("edison.worker")

MAX_WATCHED = 64  # EDISON_MAX_WATCHED in abort.c; pool.slots is at most 64


class Watch(ctypes.Structure):
    """`struct edison_watch`: flags[index[i]] >= job_id[i] means job i is cancelled."""

    _fields_ = [
        ("flags", ctypes.c_void_p),
        ("n", ctypes.c_int32),
        ("index", ctypes.c_int32 * MAX_WATCHED),
        ("job_id", ctypes.c_int64 * MAX_WATCHED),
    ]


def native_callback() -> Any | None:
    """The C callback as a `ggml_abort_callback`, or None if the package was not built."""
    spec = importlib.util.find_spec("edison.worker._abort")
    if spec is None or spec.origin is None:
        return None
    lib = ctypes.CDLL(spec.origin)
    lib.edison_max_watched.restype = ctypes.c_int32
    if lib.edison_max_watched() != MAX_WATCHED:
        return None
    address = ctypes.cast(lib.edison_batch_cancelled, ctypes.c_void_p).value
    return llama_cpp.ggml_abort_callback(address)


class BatchAbort:
    """The abort callback of one llama context, and what it watches during one step."""

    def __init__(self, ctx: llama_cpp.llama_context_p, flags: Any) -> None:
        self.ctx = ctx
        self.flags = flags
        self.watch = Watch(flags=ctypes.addressof(flags))
        callback = native_callback()
        self.native = callback is not None
        if callback is None:
            logger.warning("the compiled abort callback is missing; a slower Python one stops prefill steps only")
            callback = llama_cpp.ggml_abort_callback(lambda _data: self._cancelled())
        # Kept on self: llama.cpp holds the pointers, ctypes would free what nothing references.
        self.callback = callback
        self.off = llama_cpp.ggml_abort_callback()  # a NULL function pointer
        self.armed = False

    def watching(self, entries: list[tuple[int, int]], prefill: bool) -> None:
        """Before a step: (flag index, job id) of every sequence in its batch."""
        watch = self.watch
        for i, (index, job_id) in enumerate(entries):
            watch.index[i] = index
            watch.job_id[i] = job_id
        watch.n = len(entries)
        arm = self.native or prefill
        if arm != self.armed:
            llama_cpp.llama_set_abort_callback(self.ctx, self.callback if arm else self.off, ctypes.addressof(watch))
            self.armed = arm

    def _cancelled(self) -> bool:
        watch, flags = self.watch, self.flags
        return any(flags[watch.index[i]] >= watch.job_id[i] for i in range(watch.n))

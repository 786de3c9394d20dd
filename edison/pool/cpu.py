"""The box's cores, shared by the workers of every model: how many of them compute right now.

Each worker is sized to have the cores to itself (threads = cores / its model's workers). Two
models busy at once then run twice the threads the box has, and llama.cpp's threads meet at an
OpenMP barrier after every operation of every layer, where a thread spins (not sleeps) while it
waits: one that waits for a thread the kernel has descheduled burns its slice for nothing. On
2 cores, two models counting 64 tokens each at once took 3 to 19 s here, and over 120 s once
in CI. So the parent counts the busy workers of every model here, and each worker reads the
count before each step and takes its share of the cores: min(its threads, cores // busy)
(`share` in worker/engine.py).
Lock-free, and written only by the parent, like the cancel flags: a worker SIGKILLed mid-step
leaves nothing to clean up.
"""

from __future__ import annotations

import multiprocessing
from typing import Any


class CpuShare:
    def __init__(self) -> None:
        self.value: Any = multiprocessing.get_context("spawn").RawValue("i", 0)  # busy workers, all models
        self.busy: dict[object, int] = {}  # by pool

    def set(self, pool: object, busy_workers: int) -> None:
        if busy_workers:
            self.busy[pool] = busy_workers
        else:
            self.busy.pop(pool, None)
        self.value.value = sum(self.busy.values())

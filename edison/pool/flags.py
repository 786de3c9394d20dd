"""Cancel flags in lock-free shared memory: one per sequence slot of every worker.

`array[worker * slots + slot] = job_id` cancels that job and any older one in that slot, and
never a newer one, so a late cancel cannot stop the slot's next job. Written only by the
parent; a worker reads its own row without touching the pipe, from its generation loop and
from llama.cpp's abort callback. Lock-free on purpose: a worker SIGKILLed while holding a
lock would deadlock the parent.
"""

from __future__ import annotations

import multiprocessing
from typing import Any


class CancelFlags:
    def __init__(self, workers: int, slots: int) -> None:
        self.slots = slots
        self.array: Any = multiprocessing.get_context("spawn").RawArray("q", workers * slots)

    def cancel(self, worker: int, slot: int, job_id: int) -> None:
        self.array[worker * self.slots + slot] = job_id

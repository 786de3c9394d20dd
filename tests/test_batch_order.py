"""A step's rows go to llama_decode in KV sequence order, whatever order the jobs arrived in:
with a non-unified KV cache llama.cpp splits a batch whose sequence ids are out of order into
several ubatches, and four chats then decode at the speed of one (issue #22). In this process,
with the real model and the worker's own engine, the way `worker.main.serve` drives it."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import Any

import pytest

from edison.model import resolve_model_path
from edison.protocol import Done, Job
from edison.settings import ModelSettings, Sampling, load_settings
from tests.support import COUNTING, TEST_MODEL

pytestmark = pytest.mark.timeout(300)

SLOTS = 4


@pytest.fixture(scope="module")
def engine() -> Iterator[Any]:
    from edison.worker.engine import Engine

    path = str(resolve_model_path(ModelSettings(path=TEST_MODEL)))
    settings = load_settings(**{"model.path": path, "model.n_ctx": 1024, "pool.workers": 1, "pool.slots": SLOTS,
                                "kv_cache.ram_mib": 0, "kv_cache.disk_mib": 0})  # the slots' own KV only
    engine = Engine(path, settings, multiprocessing.RawArray("q", SLOTS), 0)
    yield engine
    engine.ctx.close()
    engine.model.close()


def job(job_id: int, prompt: str, slot: int) -> Job:
    sampling = Sampling(temperature=0.0, repeat_penalty=1.0, max_tokens=8, seed=1)
    return Job(job_id, f"test-{job_id}", sampling, prompt=prompt, slot=slot)


def run(engine: Any, jobs: list[Job]) -> tuple[list[int], list[list[int]], dict[int, Done]]:
    """Every job to its end together: the sequence each job took, the sequence id of each row
    of each step, and the finals."""
    finals: dict[int, Done] = {}

    def emit(message: object) -> None:
        if isinstance(message, Done):
            finals[message.job_id] = message

    for j in jobs:
        engine.add(j, emit)
    taken = [engine.active[j.slot].seq_id for j in jobs]
    steps = []
    while not engine.idle:
        engine.step(emit)
        batch = engine.batch
        steps.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
    assert sorted(finals) == sorted(j.job_id for j in jobs), finals
    return taken, steps, finals


def test_rows_stay_in_sequence_order_when_conversations_come_back_in_another_order(engine: Any) -> None:
    prompts = [f"{name} counts: {COUNTING}" for name in ("Ann", "Bob", "Cyd", "Dee")]
    taken, _, _ = run(engine, [job(1 + i, prompts[i], slot=i) for i in range(SLOTS)])  # job ids > 0: see the flags
    assert taken == [0, 1, 2, 3]

    # They come back in the opposite order, and each finds the sequence that holds its history:
    # in arrival order the rows would be [3, 2, 1, 0].
    back = [job(10 + i, prompts[SLOTS - 1 - i] + " 41, 42,", slot=i) for i in range(SLOTS)]
    taken, steps, finals = run(engine, back)
    assert taken == [3, 2, 1, 0]
    for i, j in enumerate(back):
        history = len(engine.model.tokenize(prompts[SLOTS - 1 - i].encode(), add_bos=True, special=False))
        assert finals[j.job_id].usage.cached_tokens >= history - 1  # only the new words were read
    assert any(len(set(rows)) == SLOTS for rows in steps), steps  # the four decoded together
    for rows in steps:
        assert rows == sorted(rows), steps

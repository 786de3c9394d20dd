"""The repeat penalty Edison applies in place (worker/sequence.py) must match llama.cpp's own
penalty sampler exactly: same window, same tokens touched, same float32 arithmetic."""

from __future__ import annotations

import ctypes
import random
from collections import deque

import llama_cpp
import numpy as np
import pytest

from edison.worker.sequence import PENALTY_LAST_N, repeat_penalty

N_VOCAB = 4096


def candidates(logits: np.ndarray) -> llama_cpp.llama_token_data_array:
    """The candidate array llama.cpp's samplers work on, one entry per token (kept alive by
    the array object's reference to its buffer)."""
    data = (llama_cpp.llama_token_data * N_VOCAB)()
    for i, logit in enumerate(logits):
        data[i].id, data[i].logit, data[i].p = i, float(logit), 0.0
    array = llama_cpp.llama_token_data_array(data=ctypes.cast(data, llama_cpp.llama_token_data_p), size=N_VOCAB, selected=-1, sorted=False)
    array._buffer = data  # type: ignore[attr-defined]
    return array


def llama_cpp_penalised(logits: np.ndarray, accepted: list[int], penalty: float) -> np.ndarray:
    sampler = llama_cpp.llama_sampler_init_penalties(N_VOCAB, PENALTY_LAST_N, penalty, 0.0, 0.0)
    try:
        for token in accepted:
            llama_cpp.llama_sampler_accept(sampler, token)
        array = candidates(logits)
        llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
        out = np.empty(N_VOCAB, dtype=np.float32)
        for i in range(array.size):
            out[array.data[i].id] = array.data[i].logit
        return out
    finally:
        llama_cpp.llama_sampler_free(sampler)


@pytest.mark.parametrize("penalty", [1.1, 1.5, 0.8])
@pytest.mark.parametrize("history", [5, PENALTY_LAST_N, 300])  # within, at and past the window
def test_the_in_place_penalty_matches_llama_cpps_sampler(penalty: float, history: int) -> None:
    rng = random.Random(history * 10 + int(penalty * 10))
    logits = np.array([rng.uniform(-20, 20) for _ in range(N_VOCAB)], dtype=np.float32)
    logits[:8] = 0.0  # the sign boundary: llama.cpp multiplies a logit <= 0
    accepted = [rng.randrange(0, 200) for _ in range(history)]  # repeats inside the window
    accepted[-3:] = [0, 1, 2]
    ours = logits.copy()
    repeat_penalty(ours, deque(accepted, maxlen=PENALTY_LAST_N), penalty)
    expected = llama_cpp_penalised(logits, accepted, penalty)
    assert np.array_equal(ours, expected)
    assert not np.array_equal(ours, logits)  # the penalty did something


def test_argmax_is_llama_cpps_greedy_choice_ties_included() -> None:
    rng = random.Random(7)
    for _ in range(20):
        logits = np.array([rng.choice([-1.0, 0.5, 3.25]) for _ in range(N_VOCAB)], dtype=np.float32)  # many ties
        greedy = llama_cpp.llama_sampler_init_greedy()
        try:
            array = candidates(logits)
            llama_cpp.llama_sampler_apply(greedy, ctypes.byref(array))
            assert array.data[array.selected].id == int(logits.argmax())
        finally:
            llama_cpp.llama_sampler_free(greedy)

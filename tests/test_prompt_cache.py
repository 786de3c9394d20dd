"""The prompt cache never changes an answer: a warm (cached) run is byte-identical to a cold one."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.support import Service, chat, long_prompt

pytestmark = pytest.mark.timeout(300)


def test_warm_answers_equal_cold_answers(make_service: Callable[..., Service]) -> None:
    svc = make_service({"pool": {"workers": 1}})
    question = "What is the capital of France?"
    cold = chat(svc.url, question)[-1].data["response"]
    assert chat(svc.url, question)[-1].data["response"] == cold

    prompt = long_prompt(1400)  # two whole 512-token chunks and a partial one
    cold_events = chat(svc.url, prompt, mode="brief")
    warm_events = chat(svc.url, prompt, mode="brief")
    assert warm_events[-1].data["response"] == cold_events[-1].data["response"]
    cold_progress = [e.data["done"] for e in cold_events if e.name == "progress"]
    warm_progress = [e.data["done"] for e in warm_events if e.name == "progress"]
    assert cold_progress[:2] == [512, 1024]
    assert len(warm_progress) < len(cold_progress)  # the shared whole chunks were not recomputed

"""The prompt cache: a returning turn keeps the KV cache of everything it shares with what a slot
holds (all but the last prompt token, which is read again for fresh logits), finds the slot that
holds its history among the free ones, and reads only its new tokens; the reply stays whole."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.support import COUNTING, Service, chat, consecutive, long_prompt

pytestmark = pytest.mark.timeout(300)


def usage(svc: Service, message: str, history: list | None = None) -> dict:
    done = chat(svc.url, message, mode="count", history=history)[-1].data
    assert done["ok"] is True and done["usage"]["completion_tokens"] == 64, done  # whole, whatever was cached
    assert consecutive(done["response"]), done["response"]
    return done


def test_returning_turns_read_only_what_they_add(make_service: Callable[..., Service]) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 2}})
    conversations = {name: f"{name} counts: {COUNTING}" for name in ("Ann", "Bob")}
    first = {name: usage(svc, message) for name, message in conversations.items()}
    assert [d["usage"]["cached_tokens"] for d in first.values()] == [0, 0]  # strangers share nothing

    for name, message in conversations.items():  # each comes back, to the slot that holds it
        history = [{"role": "user", "content": message}, {"role": "assistant", "content": first[name]["response"]}]
        again = usage(svc, "Go on: 1, 2, 3,", history)["usage"]
        # Its whole first prompt was kept (the old whole-512-token-chunks rule kept none of it), and
        # the reply too: sent back as streamed, it renders as the model wrote it (a reply that began
        # with a blank once became "Assistant:  ..." and was read again whole). A few tokens of slack
        # at the reply's end, where its last token and the next turn's line break may merge.
        before = first[name]["usage"]
        assert again["cached_tokens"] >= before["prompt_tokens"] + before["completion_tokens"] // 2, (name, again, before)
        assert again["cached_tokens"] < again["prompt_tokens"]

    prompt = long_prompt(1400)
    cold = chat(svc.url, prompt, mode="brief")[-1].data["usage"]
    warm_events = chat(svc.url, prompt, mode="brief")
    warm = warm_events[-1].data["usage"]
    assert warm["prompt_tokens"] == cold["prompt_tokens"] and warm["cached_tokens"] == cold["prompt_tokens"] - 1
    # One token read: at most one progress event, at the end (the cold run reported 512, 1024, ...).
    assert [e.data["done"] for e in warm_events if e.name == "progress"] in ([], [cold["prompt_tokens"]])
    metrics = httpx.get(f"{svc.url}/metrics", timeout=5).text
    cached = next(line for line in metrics.splitlines() if line.startswith("edison_prompt_tokens_cached_total"))
    assert float(cached.split()[-1]) >= warm["cached_tokens"]

"""The prompt cache: a returning turn keeps the KV cache of everything it shares with what a slot
holds (all but the last prompt token, which is read again for fresh logits), finds the slot that
holds its history among the free ones, and reads only its new tokens; the reply stays whole.

The test model's sliding-window layers keep only their 512-token window (`swa_full = false`), so
a prompt that goes back further than the slot still holds is read again, never continued over a
window with holes in it, and a regenerated long reply restores the prompt's saved state."""

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


NO_STORE = {"ram_mib": 0, "disk_mib": 0}


def count_to(n: int) -> str:
    return ", ".join(str(i) for i in range(1, n + 1)) + ","


def test_a_prompt_that_goes_back_beyond_the_window_is_read_again(make_service: Callable[..., Service]) -> None:
    """The second prompt shares its first ~1,040 tokens with the first (~1,440), whose slot then holds
    ~1,500 positions, of which its sliding-window layers kept the last ~768: the token after the
    shared ones would find most of its 512-token window gone. With every position kept
    (`swa_full`), the same prompt keeps them."""
    for swa_full in (False, True):
        svc = make_service({"pool": {"workers": 1, "slots": 1}, "kv_cache": NO_STORE, "model": {"swa_full": swa_full}})
        first = usage(svc, count_to(380))["usage"]
        assert first["prompt_tokens"] > 1300 and first["cached_tokens"] == 0, first
        again = usage(svc, count_to(230))["usage"]  # a whole count: what was kept is a sound prefix
        if swa_full:
            assert again["cached_tokens"] >= again["prompt_tokens"] - 8 and again["cached_from"] == "slot", again
        else:
            assert again["cached_tokens"] == 0, again
        # Forward from what the slot holds: always kept, up to where the transcript's closing
        # "Assistant:" line of the second prompt differs from the longer count.
        extended = usage(svc, count_to(240))["usage"]
        assert extended["cached_tokens"] >= again["prompt_tokens"] - 8, extended


def test_a_regenerated_long_reply_restores_the_prompt_it_answered(make_service: Callable[..., Service]) -> None:
    """A 320-token reply moves the slot's window past its prompt's end, so the same prompt sent
    again (a regenerate) cannot keep the slot's prompt; it restores the state saved when the
    prompt's first token was sent, which a later save of the prompt and its reply must not drop."""
    count320 = {"description": "a long count", "system_prompt": "", "temperature": 0.0, "seed": 1,
                "max_tokens": 320, "repeat_penalty": 1.0}
    svc = make_service({"pool": {"workers": 1, "slots": 1}, "modes": {"count320": count320}})
    prompt = count_to(260)  # ~1,000 tokens
    for turn in range(2):
        done = chat(svc.url, prompt, mode="count320")[-1].data
        assert done["ok"] is True and done["usage"]["completion_tokens"] == 320, done
        assert consecutive(done["response"]), done["response"]
        if turn == 0:
            assert done["usage"]["cached_tokens"] == 0, done["usage"]
    again = done["usage"]
    assert again["cached_from"] == "ram" and again["cached_tokens"] == again["prompt_tokens"] - 1, again

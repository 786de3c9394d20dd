"""The chat page's model picker (issue #23) in a real Chromium, against a real service with the
two bundled models configured, real workers and real loads: the picker lists both; the chosen
model is the one that answers (as the server's own GET /models tells, never the reply's words);
Stop with the second model selected stops its worker's computation; the choice is kept per
conversation across a sidebar switch and a reload; a model's load shows on the reply, and a Stop
during the load ends it as a stop.

Screenshots go to each test's tmp_path; with EDISON_DOCS_SHOTS=1 also to docs/ (chat-models.png,
chat-models-phone.png).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import COUNTING, Service, alive, wait_busy, wait_idle, write_config
from tests.test_browser import (  # noqa: F401 - fixtures
    CHROMIUM, ChatPage, browser, is_stream, open_chat, stop_reply, sync_api,
)

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: run scripts/install-browser.sh as root"),
]

FIRST = "smollm2-135m"  # the default model of the service below
SECOND = "gemma3-270m"
LAST_MODEL_KEY = "edison.model"  # web/js/store.js: the model picked last
STATE_WORDS = {"ready": "loaded", "unloaded": "not loaded", "loading": "loading…", "unloading": "unloading…"}  # web/js/models.js
LOADING_TEXT = rf"^loading model {SECOND}… \(\d+ s\)$"  # the reply's state line while SECOND loads


def two_models_config(path: Path) -> Path:
    """The test config with both bundled models as [models.NAME] tables, FIRST the default (loaded
    at start-up), one worker of two slots each, none unloaded for idleness (the tests unload)."""
    one = {"workers": 1, "slots": 2, "keep_alive_s": -1}
    return write_config(path, {"default_model": FIRST,
                               "models": {FIRST: {"path": FIRST, **one}, SECOND: {"path": SECOND, **one}}})


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("two-models")
    svc = Service(two_models_config(root / "config.toml"), root / "service.log")
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()  # the service, then every worker pid it ever had (loads included), by pid


def models(svc: Service) -> dict[str, dict[str, Any]]:
    """GET /models, by name."""
    return {m["name"]: m for m in httpx.get(f"{svc.url}/models", timeout=5).json()["models"]}


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def unload(svc: Service, name: str) -> None:
    """POST /models/unload, then until GET /models says it is unloaded."""
    svc.remember_children()
    response = httpx.post(f"{svc.url}/models/unload", json={"model": name}, timeout=30)
    assert response.status_code == 200, response.text
    wait_for(lambda: models(svc)[name]["state"] == "unloaded", f"{name} to be unloaded")


def open_two(svc: Service, open_chat: Callable[..., ChatPage], **context_args: Any) -> ChatPage:
    chat = open_chat(svc, **context_args)
    chat.page.wait_for_selector("#model:not([disabled])")
    svc.remember_children()
    return chat


def ask(chat: ChatPage, text: str) -> dict[str, Any]:
    """Sends `text`, waits for the reply to end; returns the /chat/stream body the page sent."""
    with chat.page.expect_request(lambda r: r.url.endswith("/chat/stream")) as request_info:
        chat.send(text)
    chat.wait_reply_state("done", timeout=90_000)
    return request_info.value.post_data_json


def conv(chat: ChatPage, title: str) -> Any:
    return chat.page.locator("#conversations .conv", has=chat.page.locator(".conv-title", has_text=title))


def record_states(chat: ChatPage) -> None:
    """From now on, window.__states lists each text the last reply's state line shows, with the
    reply's token count at that moment."""
    chat.page.evaluate("""() => {
        window.__states = [];
        new MutationObserver(() => {
            const reply = document.querySelector('.msg.assistant:last-of-type');
            const text = reply?.querySelector('.state')?.textContent ?? '';
            const last = window.__states[window.__states.length - 1];
            if (reply && (!last || last[0] !== text)) window.__states.push([text, +(reply.dataset.tokens ?? 0)]);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")


def test_the_picker_lists_both_models_and_the_chosen_one_answers(
    two_models: Service, open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    svc = two_models
    if models(svc)[SECOND]["state"] != "unloaded":
        unload(svc, SECOND)  # so that the answer's load proves which model it went to
    chat = open_two(svc, open_chat, viewport={"width": 1280, "height": 800})
    page = chat.page
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == [FIRST, SECOND]
    assert page.input_value("#model") == FIRST  # the server's default, nothing picked yet
    assert page.get_by_label("Model").evaluate("e => e.id") == "model"  # a labelled control
    state = models(svc)
    labels = page.eval_on_selector_all("#model option", "os => os.map(o => o.textContent)")
    assert labels[1] == f"{SECOND} (not loaded)", labels
    assert labels[0] == f"{FIRST} ({STATE_WORDS[state[FIRST]['state']]})", (labels, state[FIRST])

    page.select_option("#model", SECOND)
    page.select_option("#mode", "count")
    with page.expect_response(is_stream) as stream_info:
        chat.send(COUNTING)
    assert stream_info.value.request.post_data_json["model"] == SECOND
    chat.wait_reply_state("done", timeout=90_000)
    assert int(chat.reply().get_attribute("data-tokens") or 0) > 1

    # The server's account: SECOND was loaded for this request, FIRST's state did not move.
    after = models(svc)
    assert after[SECOND]["state"] == "ready" and after[SECOND]["loaded"], after[SECOND]
    assert after[SECOND]["load_time_s"] is not None, after[SECOND]
    assert after[FIRST]["state"] == state[FIRST]["state"], (state[FIRST], after[FIRST])
    # The page's account: the reply names its model (two to choose from), the picker the new state.
    assert chat.reply().get_attribute("data-model") == SECOND
    assert f"model: {SECOND}" in chat.reply().locator(".meta").inner_text()
    page.wait_for_function("n => document.querySelector('#model').selectedOptions[0].textContent === n",
                           arg=f"{SECOND} (loaded)")
    assert chat.stored()[-1]["model"] == SECOND
    svc.remember_children()
    chat.shot(tmp_path / "models.png", "chat-models.png")


def test_stop_with_the_second_model_selected_stops_its_worker(
    two_models: Service, open_chat: Callable[..., ChatPage]
) -> None:
    svc = two_models
    chat = open_two(svc, open_chat)
    page = chat.page
    page.select_option("#model", SECOND)
    page.select_option("#mode", "long")
    with page.expect_response(is_stream) as stream_info:
        chat.send(COUNTING)
    stream = stream_info.value
    assert stream.request.post_data_json["model"] == SECOND
    request_id = stream.headers["x-request-id"]
    pid = svc.worker_for(request_id, timeout=60)
    chat.wait_tokens(5)
    now = models(svc)  # the server's account: SECOND's worker runs it
    assert pid in now[SECOND]["workers"] and now[SECOND]["requests"] == 1 and now[FIRST]["requests"] == 0, now
    wait_busy(pid, cpu=0.2)

    clicked = stop_reply(chat, "stop button")
    wait_idle(pid, within=3.0)  # the model stopped computing: the point of Stop
    chat.wait_reply_state("stopped", timeout=5_000)
    chat.status_busy_within(1.0, since=clicked)
    tokens = int(chat.reply().get_attribute("data-tokens") or 0)
    assert tokens >= 5
    assert chat.reply().locator(".state").inner_text() == f"stopped after {tokens} tokens"
    assert stream.request.failure is None  # ended by the server's `done`, not by an abort
    chat.wait_until(lambda: svc.health()["active_requests"] == 0, what="the server's bookkeeping to empty")
    assert models(svc)[SECOND]["requests"] == 0


def test_the_choice_is_kept_per_conversation_across_a_switch_and_a_reload(
    two_models: Service, open_chat: Callable[..., ChatPage]
) -> None:
    svc = two_models
    chat = open_two(svc, open_chat)
    page = chat.page
    page.select_option("#mode", "brief")
    page.select_option("#model", SECOND)
    assert ask(chat, "Hello there")["model"] == SECOND

    page.click("#new-chat")
    assert page.input_value("#model") == SECOND  # a new conversation starts with the model picked last
    page.select_option("#model", FIRST)
    assert ask(chat, "What is the capital of France?")["model"] == FIRST

    # A sidebar switch sets the picker to that conversation's model, and sends with it.
    conv(chat, "Hello there").locator(".conv-open").click()
    assert page.input_value("#model") == SECOND
    assert ask(chat, "Again")["model"] == SECOND
    assert page.locator("#log .msg.assistant[data-model]").evaluate_all("ms => ms.map(m => m.dataset.model)") == [SECOND] * 2
    conv(chat, "capital").locator(".conv-open").click()
    assert page.input_value("#model") == FIRST

    # A change in the picker, without sending, is the conversation's choice too.
    page.select_option("#model", SECOND)
    conv(chat, "Hello there").locator(".conv-open").click()
    conv(chat, "capital").locator(".conv-open").click()
    assert page.input_value("#model") == SECOND
    page.select_option("#model", FIRST)

    stored = {c["title"]: c.get("model") for c in chat.index()}
    assert stored == {"Hello there": SECOND, "What is the capital of France?": FIRST}, stored

    page.reload()  # kept: the open conversation's model, and the other's after a switch
    page.wait_for_selector("#model:not([disabled])")
    assert page.inner_text("#chat-title") == "What is the capital of France?"
    assert page.input_value("#model") == FIRST
    conv(chat, "Hello there").locator(".conv-open").click()
    assert page.input_value("#model") == SECOND
    assert ask(chat, "Once more")["model"] == SECOND

    # A conversation saved by the page before models existed (no "model" anywhere) opens with the
    # model picked last, and loads without a complaint.
    assert page.evaluate(f"localStorage.getItem({LAST_MODEL_KEY!r})") == FIRST
    chat.preload([{"role": "user", "content": "From an older page", "state": "done"},
                  {"role": "assistant", "content": "Kept", "state": "done", "mode": "chat"}])
    page.wait_for_selector("#model:not([disabled])")
    assert page.input_value("#model") == FIRST
    assert page.locator("#log .msg.assistant").get_attribute("data-model") is None
    assert "model:" not in page.locator("#log .msg.assistant .meta").inner_text()


def test_a_load_shows_on_the_reply_and_a_stop_during_it_is_a_stop(
    two_models: Service, open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    svc = two_models
    if models(svc)[SECOND]["state"] != "unloaded":
        unload(svc, SECOND)
    chat = open_two(svc, open_chat)
    page = chat.page
    page.select_option("#model", SECOND)
    page.select_option("#mode", "count")
    record_states(chat)
    chat.send(COUNTING)
    chat.wait_reply_state("done", timeout=90_000)
    svc.remember_children()
    seen = page.evaluate("window.__states")
    loading = [i for i, (text, _) in enumerate(seen) if re.fullmatch(LOADING_TEXT, text)]
    streaming = [i for i, (_, tokens) in enumerate(seen) if tokens > 0]
    assert loading, f"no loading status on the reply: {seen}"
    assert streaming and loading[-1] < streaming[0], f"the load was not shown before the first token: {seen}"
    assert all(tokens == 0 for text, tokens in seen if re.fullmatch(LOADING_TEXT, text)), seen
    assert not re.search("loading", chat.reply().locator(".state").inner_text())  # replaced by the reply
    assert models(svc)[SECOND]["state"] == "ready"

    # Stop while it loads: the request ends as stopped, said so in words, and nobody else wants the
    # model, so its load is abandoned.
    unload(svc, SECOND)
    with page.expect_response(is_stream) as stream_info:
        chat.send(COUNTING)
    chat.wait_state_text(LOADING_TEXT)
    # The load takes ~0.75 s here: frozen (SIGSTOP), it cannot end before the Stop below, which
    # is then a Stop of a stuck load (the abandoned load is SIGKILLed, which a stopped process obeys).
    loading_pids = models(svc)[SECOND]["workers"]
    svc.known_pids |= set(loading_pids)
    for pid in loading_pids:
        os.kill(pid, signal.SIGSTOP)
    assert loading_pids and models(svc)[SECOND]["state"] == "loading", models(svc)[SECOND]
    chat.wait_state_text(rf"^loading model {SECOND}… \([1-9]\d* s\)$")  # the seconds go on
    chat.shot(tmp_path / "loading.png")
    page.click("#send")
    chat.wait_reply_state("stopped", timeout=5_000)
    assert chat.reply().locator(".state").inner_text() == "stopped while the model was loading"
    assert chat.reply().get_attribute("data-tokens") == "0"
    stored = chat.stored()[-1]
    assert stored["stopNote"] == "while the model was loading" and stored["stoppedBy"] == "queued", stored
    assert stream_info.value.request.failure is None  # ended by the server's `done`, not by an abort
    chat.wait_until(lambda: svc.health()["active_requests"] == 0, what="the server's bookkeeping to empty")
    wait_for(lambda: models(svc)[SECOND]["state"] == "unloaded", f"the abandoned load of {SECOND} to be gone", timeout=10)
    assert loading_pids and not any(alive(pid) for pid in loading_pids), loading_pids  # no worker left loading


def test_both_pickers_fit_a_phone_header(two_models: Service, open_chat: Callable[..., ChatPage], tmp_path: Path) -> None:
    chat = open_two(two_models, open_chat, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = chat.page
    chat.preload([{"role": "user", "content": "Which model is this?", "state": "done"},
                  {"role": "assistant", "content": "A small one.", "state": "done", "mode": "chat", "model": SECOND}])
    page.wait_for_selector("#model:not([disabled])")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "the page scrolls sideways"
    for selector in ("#sidebar-toggle", "#model", "#mode", "#export-md", "#export-json", "#input", "#send"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["y"] + box["height"] <= 844, (selector, box)
    header = page.locator("header.bar").bounding_box()
    assert header and header["height"] < 844 / 4, header  # the conversation keeps most of the screen
    assert "model: gemma3-270m" in page.inner_text("#log .msg.assistant .meta")
    chat.shot(tmp_path / "phone.png", "chat-models-phone.png")

"""Replies on the chat page, in a real Chromium against the real service and model: regenerate
and edit-and-resend (each stopped once, the worker idle after the click), copy buttons read
back from the clipboard, Markdown rendered, and the honest states: an empty reply, a stop
while the prompt is read (with smooth progress before it), long messages folded, speed in
small print, and a status line that is not re-announced."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import COUNTING, Service, long_prompt, wait_busy, wait_idle
from tests.test_browser import (  # noqa: F401 - fixtures
    CHROMIUM, ChatPage, browser, is_stream, open_chat, stop_reply, sync_api,
)

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: run scripts/install-browser.sh as root"),
]

FRANCE = "What is the capital of France?"


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text, "state": "done"}


def assistant(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, "state": "done", "mode": "chat", **extra}


def stop_and_check_idle(chat: ChatPage, service: Service, request_id: str, how: str) -> int:
    """Streams until busy, stops, and checks the model stopped computing; returns the tokens kept."""
    pid = service.worker_for(request_id)
    chat.wait_tokens(5)
    wait_busy(pid, cpu=0.2)
    clicked = stop_reply(chat, how)
    wait_idle(pid, within=3.0)
    chat.wait_reply_state("stopped", timeout=5_000)
    chat.status_busy_within(1.0, since=clicked)
    tokens = int(chat.reply().get_attribute("data-tokens") or 0)
    assert chat.reply().locator(".state").inner_text() == f"stopped after {tokens} tokens"
    chat.wait_until(lambda: service.health()["active_requests"] == 0, what="the server's bookkeeping to empty")
    return tokens


def test_regenerate_replaces_the_last_reply_and_a_stopped_one_keeps_its_text(
    service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    chat = open_chat(service)
    page = chat.page
    chat.preload([user("Hello there"), assistant("Hi!"), user(FRANCE), assistant("Old reply")])
    assert page.locator(".regenerate").count() == 1  # only the last reply has one
    with page.expect_request(lambda r: r.url.endswith("/chat/stream")) as request_info:
        page.click(".msg.assistant:last-of-type .regenerate")
    body = request_info.value.post_data_json
    assert body["message"] == FRANCE
    assert body["history"] == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]
    assert page.is_disabled(".msg.user .edit")  # nothing else starts while a reply runs
    chat.wait_reply_state("done", timeout=60_000)
    assert [m["content"] for m in chat.stored()][:3] == ["Hello there", "Hi!", FRANCE]
    assert len(chat.stored()) == 4 and chat.stored()[3]["content"].strip() not in ("", "Old reply")
    assert page.locator("#log .msg").count() == 4 and "Old reply" not in page.inner_text("#log")

    # Stopped during a regenerate: what it had is kept, marked stopped, the old reply is gone.
    chat.preload([user(COUNTING), assistant("1, 2, 3")])
    page.select_option("#mode", "long")
    with page.expect_response(is_stream) as stream_info:
        page.click(".regenerate")
    chat.shot(tmp_path / "regenerating.png")
    tokens = stop_and_check_idle(chat, service, stream_info.value.headers["x-request-id"], "stop button")
    stored = chat.stored()
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["state"] == "stopped" and stored[1]["stopNote"] == f"after {tokens} tokens"
    assert stored[1]["content"].strip() and stored[1]["content"] != "1, 2, 3"
    assert page.locator(".regenerate").count() == 1  # a stopped reply can be regenerated again
    chat.shot(tmp_path / "regenerate-stopped.png", "chat-regenerate-stopped.png")


def test_edit_resends_from_that_message_and_replaces_what_followed(
    service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    chat = open_chat(service)
    page = chat.page
    chat.preload([user("Hello there"), assistant("Hi!"), user("What is 2+2?"), assistant("4")])
    page.select_option("#mode", "brief")

    # Esc leaves an edit unchanged.
    page.locator(".msg.user .edit").first.click()
    assert page.input_value(".edit-box") == "Hello there"
    assert page.evaluate("document.activeElement.className") == "edit-box"
    page.fill(".edit-box", "Never sent")
    page.keyboard.press("Escape")
    assert page.locator(".edit-box").count() == 0 and "Never sent" not in page.inner_text("#log")
    assert page.evaluate("document.activeElement.className").startswith("edit")  # back on its Edit button

    # The second question, edited: the first exchange goes as history, "4" is replaced.
    page.locator(".msg.user .edit").first.click()
    page.click(".msg.user[data-index='2'] .edit")  # the first editor closes: one at a time
    assert page.locator(".edit-box").count() == 1 and page.input_value(".edit-box") == "What is 2+2?"
    page.fill(".edit-box", FRANCE)
    chat.shot(tmp_path / "editing.png", "chat-edit.png")
    with page.expect_request(lambda r: r.url.endswith("/chat/stream")) as request_info:
        page.press(".edit-box", "Enter")
    body = request_info.value.post_data_json
    assert body["message"] == FRANCE and body["mode"] == "brief"
    assert body["history"] == [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]
    chat.wait_reply_state("done", timeout=60_000)
    stored = chat.stored()
    assert [m["content"] for m in stored][:3] == ["Hello there", "Hi!", FRANCE] and len(stored) == 4
    assert stored[3]["content"] != "4"

    # The first message, edited and stopped with Esc: everything after it is gone.
    page.select_option("#mode", "long")
    page.locator(".msg.user .edit").first.click()
    page.fill(".edit-box", COUNTING)
    with page.expect_response(is_stream) as stream_info:
        page.click(".edit-send")
    assert stream_info.value.request.post_data_json["history"] == []
    assert page.locator("#log .msg").count() == 2
    tokens = stop_and_check_idle(chat, service, stream_info.value.headers["x-request-id"], "escape key")
    stored = chat.stored()
    assert [(m["role"], m["state"]) for m in stored] == [("user", "done"), ("assistant", "stopped")]
    assert stored[0]["content"] == COUNTING and stored[1]["stopNote"] == f"after {tokens} tokens"
    assert chat.titles()[0].startswith("1, 2, 3, 4")  # the title follows the first message (shortened)


def test_copy_buttons_put_the_reply_and_each_code_block_on_the_clipboard(
    service: Service, open_chat: Callable[..., ChatPage]
) -> None:
    chat = open_chat(service, permissions=["clipboard-read", "clipboard-write"])
    page = chat.page
    clipboard = lambda: page.evaluate("navigator.clipboard.readText()")  # noqa: E731

    chat.send(FRANCE)  # a real reply
    chat.wait_reply_state("done", timeout=60_000)
    page.click(".msg.assistant:last-of-type .copy-reply")
    page.wait_for_selector(".msg.assistant:last-of-type .copy-reply:text('Copied')")
    assert clipboard() == chat.stored()[1]["content"] and clipboard().strip()

    reply = "Two blocks:\n\n```python\nprint('a')\n```\n\nand\n\n```sh\necho \"<b>\" && ls -l\n```\n"
    chat.preload([user("Show me code"), assistant(reply)])
    assert page.locator(".codeblock .lang").all_inner_texts() == ["python", "sh"]
    page.locator(".copy-code").nth(1).click()
    page.wait_for_selector(".copy-code:text('Copied')")
    assert clipboard() == 'echo "<b>" && ls -l'
    page.locator(".copy-code").nth(0).click()
    chat.wait_until(lambda: clipboard() == "print('a')", what="the first block on the clipboard")
    page.click(".copy-reply")
    chat.wait_until(lambda: clipboard() == reply, what="the whole reply (its Markdown) on the clipboard")
    page.wait_for_function("() => document.getElementById('announce').textContent === 'Copied to the clipboard'")


MARKDOWN = """## Plan

Some *emphasis*, **strong** and `inline code`.

- first
- second
  - nested

1. one
2. two

| Name | Value |
|------|------:|
| a    | 1     |
| b    | 2     |

> quoted

```js
const x = 1 < 2;
```

See [the docs](https://example.com/docs) or <https://example.org>.
"""


def test_markdown_lists_tables_code_and_links_render(
    service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    chat = open_chat(service, viewport={"width": 1100, "height": 860})  # the README's picture: the whole reply
    page = chat.page
    chat.preload([user("Why is the sky blue?"), assistant("Rayleigh scattering: blue light scatters most.")])
    chat.preload([user("Plan a weekend in Lyon"), assistant("Day one: Vieux Lyon and Fourvière.", state="stopped",
                                                            stopNote="after 12 tokens")])
    chat.preload([user("Show a plan with a table, a list and some code"),
                  assistant(MARKDOWN, stats={"ttftMs": 412, "tokens": 96, "perSecond": 41.7})])
    body = ".msg.assistant .body"
    assert page.inner_text(f"{body} h2") == "Plan"
    assert page.inner_text(f"{body} em") == "emphasis" and page.inner_text(f"{body} strong") == "strong"
    assert page.inner_text(f"{body} p code") == "inline code"
    assert page.locator(f"{body} > ul > li").count() == 2 and page.inner_text(f"{body} ul ul li") == "nested"
    assert page.locator(f"{body} ol li").all_inner_texts() == ["one", "two"]
    assert page.locator(f"{body} .table-wrap table th").all_inner_texts() == ["Name", "Value"]
    assert page.locator(f"{body} table tbody tr").count() == 2
    assert page.inner_text(f"{body} blockquote") == "quoted"
    assert page.inner_text(f"{body} .codeblock .lang") == "js"
    assert page.inner_text(f"{body} pre code") == "const x = 1 < 2;"
    assert page.evaluate(f"getComputedStyle(document.querySelector('{body} pre code')).fontFamily").lower().find("mono") >= 0
    links = page.eval_on_selector_all(f"{body} a", "as => as.map(a => [a.textContent, a.href, a.target, a.rel])")
    assert links == [
        ["the docs", "https://example.com/docs", "_blank", "noopener noreferrer nofollow"],
        ["https://example.org", "https://example.org/", "_blank", "noopener noreferrer nofollow"],
    ]
    assert page.inner_text(".msg.assistant .meta") == "mode: chat · first token 0.41 s · 41.7 tokens/s · 96 tokens"
    chat.shot(tmp_path / "markdown.png", "chat-markdown.png")
    chat.shot(tmp_path / "screenshot.png", "screenshot.png")  # the README's picture


def test_an_empty_reply_says_so(service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path) -> None:
    """Measured on the bundled model: after two blank replies in the history it answers "Hello"
    with blanks only (temperature 0, so always)."""
    chat = open_chat(service)
    page = chat.page
    chat.preload([user("Hi"), assistant(" "), user("Yo"), assistant(" ")])
    page.select_option("#mode", "brief")
    chat.send("Hello")
    chat.wait_reply_state("done", timeout=60_000)
    reply = chat.reply()
    assert chat.stored()[-1]["content"].strip() == ""
    assert reply.get_attribute("data-empty") == "true"
    assert reply.locator(".state").inner_text() == "Empty reply: the model ended without writing any text."
    assert reply.locator(".copy-reply").count() == 0  # nothing to copy
    chat.shot(tmp_path / "empty.png", "chat-empty-reply.png")


# Installed before the prompt is sent: every state-line text and every real progress figure, timed.
RECORD_PROGRESS = """() => {
    window.__progress = [];
    new MutationObserver(() => {
        const reply = document.querySelector('.msg.assistant:last-of-type');
        if (!reply) return;
        const shown = /^reading prompt (\\d+) %$/.exec(reply.querySelector('.state')?.textContent ?? '');
        const [done, total] = (reply.dataset.prefill ?? '').split('/').map(Number);
        const last = window.__progress[window.__progress.length - 1];
        const entry = {t: performance.now(), shown: shown ? +shown[1] : null, real: total ? Math.floor(100 * done / total) : null};
        if (!last || last.shown !== entry.shown || last.real !== entry.real) window.__progress.push(entry);
    }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true, attributes: true});
}"""


def test_prompt_progress_is_smooth_and_a_stop_while_reading_says_where(
    service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    chat = open_chat(service)
    page = chat.page
    page.select_option("#mode", "long")
    page.evaluate(RECORD_PROGRESS)
    with page.expect_response(is_stream) as stream_info:
        chat.send(long_prompt(3500))  # ~7 chunks of 512 tokens, one progress event each
    request_id = stream_info.value.headers["x-request-id"]
    pid = service.worker_for(request_id)
    page.wait_for_function(
        "() => +(document.querySelector('.msg.assistant:last-of-type')?.dataset.prefill?.split('/')[0] ?? 0) >= 2 * 512",
        timeout=60_000,
    )
    page.wait_for_timeout(700)  # into the next chunk, between two events
    chat.shot(tmp_path / "prefill.png", "chat-prefill.png")
    clicked = stop_reply(chat, "stop button")
    wait_idle(pid, within=3.0)
    chat.wait_reply_state("stopped", timeout=5_000)
    chat.status_busy_within(1.0, since=clicked)

    entries = page.evaluate("window.__progress")
    reals = [e["real"] for e in entries if e["real"] is not None]
    last_real = reals[-1]
    state = chat.reply().locator(".state").inner_text()
    assert state == f"stopped while reading the prompt ({last_real} %)", state
    assert chat.stored()[-1]["stopNote"] == f"while reading the prompt ({last_real} %)"

    # Smooth: more steps shown than events sent; never back, never ahead of the next event.
    shown = [(e["t"], e["shown"]) for e in entries if e["shown"] is not None]
    values = [v for _, v in shown]
    assert values == sorted(values), values
    events = sorted({(e["real"], min(x["t"] for x in entries if x["real"] == e["real"])) for e in entries if e["real"] is not None})
    assert len(set(values)) >= len(events) + 4, (values, events)
    for t, value in shown:
        upcoming = [real for real, at in events if at > t]
        if upcoming:
            assert value <= upcoming[0], f"showed {value} % before the server said {upcoming[0]} %: {entries}"
    chat.shot(tmp_path / "prefill-stopped.png", "chat-stopped-prefill.png")


def test_a_long_message_folds_and_the_status_line_is_not_re_announced(
    service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    chat = open_chat(service)
    page = chat.page
    pasted = "\n".join(f"line {i}: " + "lorem ipsum dolor sit amet " * 4 for i in range(240))[:27_000]
    chat.preload([user(pasted), assistant("Noted.")])
    view = page.locator(".msg.user")
    toggle = view.locator(".show-all")
    assert toggle.inner_text() == "Show all (27,000 characters)"
    assert toggle.get_attribute("aria-expanded") == "false"
    assert view.bounding_box()["height"] < 320
    chat.shot(tmp_path / "folded.png", "chat-long-message.png")
    toggle.click()
    assert toggle.get_attribute("aria-expanded") == "true" and toggle.inner_text() == "Show less"
    assert view.bounding_box()["height"] > 2000
    toggle.click()
    assert view.bounding_box()["height"] < 320
    assert page.inner_text(".msg.user .plain") == pasted  # folded, never cut

    # The status line changes every few seconds: it must not be a live region, nor inside one.
    assert page.evaluate("document.getElementById('status').closest('[aria-live], [role=status], [role=log], [role=alert]')") is None
    page.evaluate("""() => {
        window.__announced = 0;
        new MutationObserver(() => window.__announced++).observe(
            document.getElementById('announce'), {subtree: true, childList: true, characterData: true});
    }""")
    health = len([r for r in chat.requests if r.url.endswith("/health")])
    deadline = time.monotonic() + 15
    while len([r for r in chat.requests if r.url.endswith("/health")]) < health + 2:
        assert time.monotonic() < deadline, "the status line was not refreshed"
        page.wait_for_timeout(200)
    assert re.search(r"ready · workers 2/2 ready, 0 busy", page.inner_text("#status-text"))
    assert page.evaluate("window.__announced") == 0

"""The web chat page (web/) in a real Chromium against the real service, real workers and
the real model. Stop and Esc are checked where it matters: the worker's CPU falls to idle.

Chromium comes from Debian (`scripts/install-browser.sh`); `playwright install` cannot
download here. Without /usr/bin/chromium these tests skip and say why. page.route fakes a
response only in the rendering check (a model cannot be made to emit markup on demand).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import COUNTING, Service, Stream, long_prompt, wait_busy, wait_idle

CHROMIUM = Path("/usr/bin/chromium")
# Playwright 1.64.1 is the release built for Chromium 156 (see BROWSER-TESTS recipe).
CHROMIUM_MAJOR = 156
STORAGE_KEY = "edison.conversation.v1"  # web/js/store.js
API_KEY_STORAGE = "edison.apiKey"  # web/js/auth.js
WAIT_MS = 30_000  # any single page wait; the machine is small and shared

# Checked at collection, so a skip starts no service.
pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is missing: run scripts/install-browser.sh as root (apt-get install chromium)",
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            major = int(chromium.version.split(".")[0])
            if major != CHROMIUM_MAJOR:
                pytest.fail(
                    f"Chromium {chromium.version} at {CHROMIUM} but Playwright is pinned for Chromium "
                    f"{CHROMIUM_MAJOR}: pin the playwright release built for this Chromium in pyproject.toml"
                )
            yield chromium
        finally:
            chromium.close()


@dataclass
class ChatPage:
    """One browser tab on the chat page, with its console and uncaught errors recorded."""

    page: Any
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: list[Any] = field(default_factory=list)

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def reply(self) -> Any:
        return self.page.locator(".msg.assistant").last

    def wait_reply_state(self, state: str, timeout: float = WAIT_MS) -> None:
        self.page.wait_for_selector(f".msg.assistant:last-of-type[data-state={state}]", timeout=timeout)

    def wait_tokens(self, count: int, timeout: float = WAIT_MS) -> None:
        self.page.wait_for_function(
            "k => +(document.querySelector('.msg.assistant:last-of-type')?.dataset.tokens ?? 0) >= k",
            arg=count, timeout=timeout,
        )

    def wait_state_text(self, pattern: str, timeout: float = WAIT_MS) -> None:
        """Until the last reply's state line matches the JS regex `pattern`."""
        self.page.wait_for_function(
            "p => new RegExp(p).test(document.querySelector('.msg.assistant:last-of-type .state')?.textContent ?? '')",
            arg=pattern, timeout=timeout,
        )

    def stored(self) -> list[dict[str, Any]]:
        return json.loads(self.page.evaluate(f"localStorage.getItem({STORAGE_KEY!r})") or "[]")

    def shot(self, path: Path) -> None:
        self.page.screenshot(path=str(path))

    def wait_until(self, check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        """Polls `check` while letting Playwright deliver its events."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.page.wait_for_timeout(50)


@pytest.fixture
def open_chat(browser: Any) -> Iterator[Callable[..., ChatPage]]:
    """Opens the page in a fresh context (empty localStorage); no uncaught JS error allowed."""
    contexts: list[Any] = []
    pages: list[ChatPage] = []

    def open_(service: Service, ready: bool = True, **context_args: Any) -> ChatPage:
        """ready: wait until the modes are loaded (False when a key dialog comes first)."""
        context = browser.new_context(**{"viewport": {"width": 1000, "height": 700}, **context_args})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        chat = ChatPage(page)
        page.on("console", lambda m: chat.console.append(m.text))
        page.on("pageerror", lambda e: chat.errors.append(str(e)))
        page.on("request", lambda r: chat.requests.append(r))
        pages.append(chat)
        page.goto(f"{service.url}/")
        if not ready:
            return chat
        try:
            page.wait_for_selector("#mode:not([disabled])")
        except Exception as exc:  # noqa: BLE001 - say why the page never came up
            raise AssertionError(f"the page did not load its modes: {exc}\nerrors: {chat.errors}\nconsole: {chat.console}") from None
        return chat

    try:
        yield open_
        for chat in pages:
            assert not chat.errors, f"uncaught errors in the page: {chat.errors}"
    finally:
        for context in contexts:
            context.close()


def is_stream(response: Any) -> bool:
    return response.url.endswith("/chat/stream")


def test_message_streams_into_the_page_and_ends(service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path) -> None:
    chat = open_chat(service)
    page = chat.page
    assert page.eval_on_selector_all("#mode option", "os => os.map(o => o.value)") == ["chat", "brief", "long"]
    assert page.input_value("#mode") == "chat"
    page.wait_for_selector("#status[data-state=ok]")
    assert "workers 2/2 ready" in page.inner_text("#status")
    chat.shot(tmp_path / "idle.png")

    # Record every length the reply's text goes through: tokens must show as they arrive.
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const live = document.querySelector('.msg.assistant:last-of-type .live');
            if (live) window.__lengths.push(live.textContent.length);
        }).observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
    }""")
    with page.expect_response(is_stream) as stream_info:
        chat.send("What is the capital of France?")
    request_id = stream_info.value.headers["x-request-id"]
    assert page.inner_text("#send") == "Stop"
    chat.wait_reply_state("done", timeout=60_000)

    reply = chat.reply()
    assert "Paris" in reply.locator(".body").inner_text()
    assert "mode: chat" in reply.locator(".meta").inner_text()
    assert page.inner_text("#send") == "Send"
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), f"text did not grow token by token: {lengths}"
    assert f"Streaming request started: {request_id}" in chat.console
    assert [m["role"] for m in chat.stored()] == ["user", "assistant"]


@pytest.mark.parametrize("how", ["stop button", "escape key"])
def test_stop_cancels_on_the_server_and_the_worker_goes_idle(
    how: str, service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    chat = open_chat(service)
    page = chat.page
    page.select_option("#mode", "long")
    with page.expect_response(is_stream) as stream_info:
        chat.send(COUNTING)
    stream = stream_info.value
    request_id = stream.headers["x-request-id"]
    pid = service.worker_for(request_id)
    chat.wait_tokens(5)
    wait_busy(pid, cpu=0.2)
    assert page.inner_text("#send") == "Stop"
    chat.shot(tmp_path / "streaming.png")

    cancels: list[Any] = []
    page.on("response", lambda r: cancels.append(r) if r.url.endswith("/chat/cancel") else None)
    if how == "stop button":
        page.click("#send")
    else:
        page.keyboard.press("Escape")

    wait_idle(pid, within=3.0)  # the model stopped computing: the point of Stop
    # Both halves of Stop, in the browser's network log: the cancel POST for the init's
    # request id, answered by the server, and the aborted stream fetch.
    chat.wait_until(lambda: bool(cancels), what="POST /chat/cancel in the network log")
    cancel = cancels[0]
    assert cancel.request.post_data_json == {"request_id": request_id}
    assert cancel.status == 200
    # "not_found" only if the aborted connection's own cancel reached the server first.
    assert cancel.json()["request_id"] == request_id and cancel.json()["status"] in ("cancelled", "not_found")
    chat.wait_until(lambda: stream.request.failure is not None, what="the stream fetch to be aborted")
    assert stream.request.failure == "net::ERR_ABORTED"

    chat.wait_reply_state("stopped", timeout=5_000)
    reply = chat.reply()
    kept = reply.locator(".body").inner_text()
    assert kept.strip() and "stopped" in reply.locator(".state").inner_text()
    assert page.inner_text("#send") == "Send"
    chat.wait_until(lambda: f"Cancelled request {request_id} on server" in " ".join(chat.console), what="the cancel log")
    assert f"Streaming request started: {request_id}" in chat.console
    stored = chat.stored()[-1]
    assert stored["state"] == "stopped" and stored["content"].strip() == kept.strip()
    chat.wait_until(lambda: service.health()["active_requests"] == 0, what="the server's bookkeeping to empty")
    chat.shot(tmp_path / "stopped.png")


def test_reload_keeps_the_history_and_sends_it(service: Service, open_chat: Callable[..., ChatPage]) -> None:
    chat = open_chat(service)
    page = chat.page
    page.select_option("#mode", "brief")
    chat.send("Hello there")
    chat.wait_reply_state("done", timeout=60_000)
    before = page.locator(".msg").all_inner_texts()

    page.reload()
    page.wait_for_selector("#mode:not([disabled])")
    assert page.locator(".msg").all_inner_texts() == before
    assert page.input_value("#mode") == "brief"  # the chosen mode survives too
    stored = chat.stored()
    assert [m["role"] for m in stored] == ["user", "assistant"]

    with page.expect_request(lambda r: r.url.endswith("/chat/stream")) as request_info:
        chat.send("And again")
    body = request_info.value.post_data_json
    assert body["mode"] == "brief" and body["message"] == "And again"
    assert body["history"] == [
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": stored[1]["content"]},
    ]
    chat.wait_reply_state("done", timeout=60_000)
    assert page.locator(".msg").count() == 4


def test_http_error_answer_is_shown(service: Service, open_chat: Callable[..., ChatPage]) -> None:
    chat = open_chat(service)
    chat.send("x" * 250_000)  # over the service's max_body_bytes (200,000 in the test config)
    chat.wait_reply_state("error")
    state = chat.reply().locator(".state").inner_text()
    assert "413" in state and "limit" in state, state
    assert chat.page.inner_text("#send") == "Send"


def test_queue_and_prompt_progress_show_then_a_dead_worker_is_an_error(
    make_service: Callable[..., Service], open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    svc = make_service({"pool": {"workers": 1, "prefill_chunk": 128}})  # small chunks: progress comes soon
    blocker = Stream(svc.url, {"message": COUNTING, "mode": "long"})  # takes the only worker
    blocker.wait_for("token")
    chat = open_chat(svc)
    page = chat.page
    page.select_option("#mode", "long")
    with page.expect_response(is_stream) as stream_info:
        chat.send(long_prompt(1500))
    request_id = stream_info.value.headers["x-request-id"]
    chat.wait_state_text(r"^queued, position 1$")

    svc.cancel(blocker.request_id)
    chat.wait_state_text(r"^reading prompt \d+ %$", timeout=60_000)
    pid = svc.worker_for(request_id)
    os.kill(pid, signal.SIGKILL)

    chat.wait_reply_state("error")
    state = chat.reply().locator(".state").inner_text()
    assert state.startswith("Error:") and "died" in state, state
    assert chat.stored()[-1]["state"] == "error"
    chat.shot(tmp_path / "error.png")


def test_dropped_connection_is_an_error_and_the_status_line_notices(
    make_service: Callable[..., Service], open_chat: Callable[..., ChatPage]
) -> None:
    svc = make_service({"pool": {"workers": 1}})
    chat = open_chat(svc)
    page = chat.page
    page.select_option("#mode", "long")
    with page.expect_response(is_stream) as stream_info:
        chat.send(COUNTING)
    svc.worker_for(stream_info.value.headers["x-request-id"])  # remembered, so it is killed at the end
    chat.wait_tokens(3)
    assert svc.proc is not None
    svc.proc.kill()  # the whole server, mid-reply
    svc.proc.wait(timeout=10)

    chat.wait_reply_state("error")
    state = chat.reply().locator(".state").inner_text()
    assert "connection dropped" in state, state
    assert chat.reply().locator(".body").inner_text().strip()  # the text so far is kept
    page.wait_for_selector("#status[data-state=down]", timeout=15_000)
    assert "unreachable" in page.inner_text("#status")


def test_markup_in_model_output_and_history_is_shown_as_text(service: Service, open_chat: Callable[..., ChatPage]) -> None:
    chat = open_chat(service)
    page = chat.page
    attack = ['<script>window.__xss = "script"</script>', '<img src=x onerror="window.__xss = \'img\'">']
    history = [
        {"role": "user", "content": attack[0], "state": "done"},
        {"role": "assistant", "content": f"Sure:\n\n{attack[1]}", "state": "done", "mode": "chat"},
    ]
    page.evaluate("([key, value]) => localStorage.setItem(key, value)", [STORAGE_KEY, json.dumps(history)])
    page.reload()
    page.wait_for_selector(".msg.assistant")

    # A crafted reply: markup split across tokens, then a code block.
    tokens = ["<img src=x ", 'onerror="window.__xss = \'token\'">', " and ", "<b>bold</b>\n\n```\n", "<i>code</i>\n```"]
    text = "".join(tokens)
    body = "".join(
        f"event: {name}\ndata: {json.dumps(data)}\n\n"
        for name, data in [("init", {"request_id": "00000000-0000-4000-8000-000000000000"}),
                           *[("token", {"t": t}) for t in tokens],
                           ("done", {"ok": True, "response": text, "mode_used": "chat", "finish_reason": "stop"})]
    )
    page.route("**/chat/stream", lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body))
    chat.send('<img src=x onerror="window.__xss = \'echo\'">')
    chat.wait_reply_state("done")

    log_text = page.inner_text("#log")
    for markup in [*attack, '<img src=x onerror="window.__xss = \'token\'">', "<b>bold</b>", "<i>code</i>"]:
        assert markup in log_text
    assert page.locator("#log img, #log script, #log b, #log i").count() == 0
    assert page.locator(".msg.assistant:last-of-type pre code").inner_text() == "<i>code</i>"
    page.wait_for_timeout(300)  # an injected onerror would have fired by now
    assert page.evaluate("window.__xss") is None


def test_phone_screen_dark_scheme_and_keyboard(service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path) -> None:
    chat = open_chat(service, viewport={"width": 360, "height": 640}, color_scheme="dark", is_mobile=True, has_touch=True)
    page = chat.page
    history = [{"role": "user", "content": "a" * 300, "state": "done"},
               {"role": "assistant", "content": "word " * 80, "state": "stopped", "mode": "long"}]
    page.evaluate("([key, value]) => localStorage.setItem(key, value)", [STORAGE_KEY, json.dumps(history)])
    page.reload()
    page.wait_for_selector(".msg.assistant[data-state=stopped]")

    assert page.evaluate("document.documentElement.scrollWidth") <= 360, "the page scrolls sideways"
    for selector in ("#input", "#send", "#mode"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360 and box["y"] + box["height"] <= 640, selector
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert sum(int(c) for c in background[background.index("(") + 1 : -1].split(",")[:3]) < 3 * 80, background

    # Keyboard: Tab reaches every control; Shift+Enter is a newline, not a send.
    page.locator("#mode").focus()
    order = []
    for _ in range(4):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id"))
    # Chromium also stops on the scrollable conversation ("log"), which lets it scroll by keys.
    assert [i for i in order if i != "log"][:3] == ["clear", "input", "send"], order
    page.locator("#input").focus()
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#input") == "line one\nline two"
    assert page.locator(".msg").count() == 2
    chat.shot(tmp_path / "phone-dark.png")


def test_api_key_is_asked_for_remembered_and_asked_again_when_refused(
    make_service: Callable[..., Service], open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    key = "s3cret-key"
    svc = make_service({"server": {"api_key": key}, "pool": {"workers": 1}})
    chat = open_chat(svc, ready=False)
    page = chat.page
    dialog = "#key-dialog"

    def sent(path: str) -> list[tuple[str | None, int | None]]:
        """(Authorization header, status) of each request the page made to `path`."""
        out = []
        for r in chat.requests:
            assert key not in r.url, f"the key is in a URL: {r.url}"
            if r.url.endswith(path):
                response = r.response()
                out.append((r.all_headers().get("authorization"), response.status if response else None))
        return out

    # The page's own GET /modes is the first 401: the dialog opens at load, focus in the field.
    page.wait_for_selector(f"{dialog}[open]")
    assert page.evaluate("document.activeElement.id") == "key-input"
    assert page.get_attribute("#key-input", "type") == "password"
    assert "needs an API key" in page.inner_text("#key-reason")
    chat.shot(tmp_path / "key-dialog.png")
    page.click("#key-cancel")  # the modes say why they are missing
    page.wait_for_selector(dialog, state="hidden")
    page.wait_for_selector("#mode-description.error")
    assert "API key" in page.inner_text("#mode-description")

    chat.send("Hello")  # 401 again: asked again; Escape cancels the dialog (not a Stop): an error
    page.wait_for_selector(f"{dialog}[open]")
    page.keyboard.press("Escape")
    chat.wait_reply_state("error")
    state = chat.reply().locator(".state").inner_text()
    assert "needs an API key" in state and "Send again" in state, state

    chat.send("What is the capital of France?")  # asked; the key typed; the request sent again
    page.wait_for_selector(f"{dialog}[open]")
    page.fill("#key-input", key)
    page.press("#key-input", "Enter")
    chat.wait_reply_state("done", timeout=60_000)
    assert "Paris" in chat.reply().locator(".body").inner_text()
    assert int(chat.reply().get_attribute("data-tokens") or 0) > 1
    assert sent("/chat/stream") == [(None, 401), (None, 401), (f"Bearer {key}", 200)]
    page.wait_for_selector("#mode:not([disabled])")  # the modes are loaded now that there is a key
    assert page.evaluate(f"localStorage.getItem({API_KEY_STORAGE!r})") == key

    chat.requests.clear()
    page.reload()  # remembered: no dialog, the modes load with the key
    page.wait_for_selector("#mode:not([disabled])")
    assert not page.locator(dialog).is_visible()
    assert sent("/modes") == [(f"Bearer {key}", 200)]

    # A stored key the server refuses (changed since): cleared, and asked for once more.
    page.evaluate("([k, v]) => localStorage.setItem(k, v)", [API_KEY_STORAGE, "old-key"])
    chat.requests.clear()
    page.reload()
    page.wait_for_selector(f"{dialog}[open]")
    assert "refused the stored API key" in page.inner_text("#key-reason")
    assert page.evaluate(f"localStorage.getItem({API_KEY_STORAGE!r})") is None
    page.fill("#key-input", key)
    page.press("#key-input", "Enter")
    page.wait_for_selector("#mode:not([disabled])")
    assert sent("/modes") == [("Bearer old-key", 401), (f"Bearer {key}", 200)]
    assert page.evaluate(f"localStorage.getItem({API_KEY_STORAGE!r})") == key

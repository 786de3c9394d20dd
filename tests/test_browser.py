"""The web chat page (web/) in a real Chromium against the real service, real workers and
the real model. Stop and Esc are checked where it matters: the worker's CPU falls to idle.

Chromium comes from Debian (`scripts/install-browser.sh`); `playwright install` cannot
download here. Without /usr/bin/chromium these tests skip and say why. page.route fakes a
response only in the rendering check (a model cannot be made to emit markup on demand) and
fails the cancel POST in the fallback check. The fixtures here serve tests/test_browser_*.py too.

Screenshots go to each test's tmp_path; with EDISON_DOCS_SHOTS=1 also to docs/ (the README's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edison.settings import PoolSettings
from tests.support import COUNTING, REPO, Service, Stream, long_prompt, wait_busy, wait_idle

CHROMIUM = Path("/usr/bin/chromium")
# Playwright 1.64.1 is the release built for Chromium 156 (see BROWSER-TESTS recipe).
CHROMIUM_MAJOR = 156
OLD_STORAGE_KEY = "edison.conversation.v1"  # the single conversation of the old page; migrated (web/js/store.js)
INDEX_KEY = "edison.conversations.v2"  # web/js/store.js
CURRENT_KEY = "edison.current.v2"
MESSAGES_PREFIX = "edison.conversation.v2."
API_KEY_STORAGE = "edison.apiKey"  # web/js/auth.js
WAIT_MS = 30_000  # any single page wait; the machine is small and shared
DOCS = REPO / "docs"
# One worker with one slot, so a second request waits in the queue. `slots` (continuous
# batching) exists once the batching work is merged; before that a worker has one sequence.
ONE_SEQUENCE: dict[str, Any] = {"workers": 1}
if "slots" in {f.name for f in dataclasses.fields(PoolSettings)}:
    ONE_SEQUENCE["slots"] = 1
DOCS_SHOTS = os.environ.get("EDISON_DOCS_SHOTS") == "1"

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
        """The open conversation's messages as kept in localStorage."""
        return json.loads(self.page.evaluate(
            "([cur, prefix]) => localStorage.getItem(prefix + localStorage.getItem(cur))",
            [CURRENT_KEY, MESSAGES_PREFIX],
        ) or "[]")

    def index(self) -> list[dict[str, Any]]:
        """The conversation list as kept in localStorage."""
        return json.loads(self.page.evaluate(f"localStorage.getItem({INDEX_KEY!r})") or "[]")

    def titles(self) -> list[str]:
        """The conversation list as shown, top to bottom."""
        return self.page.locator("#conversations .conv-title").all_inner_texts()

    def preload(self, messages: list[dict[str, Any]]) -> None:
        """Opens `messages` as a conversation, through the old page's storage key (migrated on load)."""
        self.page.evaluate("([k, v]) => localStorage.setItem(k, v)", [OLD_STORAGE_KEY, json.dumps(messages)])
        self.page.reload()
        self.page.wait_for_selector("#mode:not([disabled])")
        self.page.wait_for_function("n => document.querySelectorAll('#log .msg').length === n", arg=len(messages))

    def shot(self, path: Path, docs_name: str = "") -> None:
        self.page.screenshot(path=str(path))
        if docs_name and DOCS_SHOTS:
            self.page.screenshot(path=str(DOCS / docs_name))

    def wait_until(self, check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
        """Polls `check` while letting Playwright deliver its events."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            self.page.wait_for_timeout(50)

    def status_busy_within(self, seconds: float, since: float) -> float:
        """Seconds from `since` (time.monotonic()) until the status line says "0 busy"; fails after `seconds`."""
        left_ms = max(1.0, (since + seconds - time.monotonic()) * 1000)
        try:
            self.page.wait_for_function(
                "() => /\\b0 busy\\b/.test(document.getElementById('status-text').textContent)", timeout=left_ms, polling=20,
            )
        except Exception:  # noqa: BLE001 - say what the line showed
            raise AssertionError(
                f"status line not at 0 busy {seconds} s after the stop: {self.page.inner_text('#status-text')!r}"
            ) from None
        return time.monotonic() - since


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
    assert page.eval_on_selector_all("#mode option", "os => os.map(o => o.value)") == ["chat", "brief", "long", "count"]
    assert page.input_value("#mode") == "chat"
    page.wait_for_selector("#status[data-state=ok]")
    assert "workers 2/2 ready" in page.inner_text("#status")
    assert "No saved conversations yet" in page.inner_text("#sidebar")
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
    assert reply.locator(".body").inner_text().strip()  # rendered (what it says is the model's business)
    meta = reply.locator(".meta").inner_text()
    # Small print: mode, time to first token and speed, measured by the page.
    assert re.fullmatch(r"mode: chat · first token \d+\.\d\d s · \d+\.\d tokens/s · \d+ tokens", meta), meta
    tokens = int(re.search(r"(\d+) tokens$", meta).group(1))
    assert tokens == int(reply.get_attribute("data-tokens") or 0) > 1
    assert page.inner_text("#send") == "Send"
    lengths = page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3 and lengths == sorted(lengths), f"text did not grow token by token: {lengths}"
    assert f"Streaming request started: {request_id}" in chat.console
    assert [m["role"] for m in chat.stored()] == ["user", "assistant"]
    assert chat.stored()[1]["stats"]["tokens"] == tokens
    assert chat.titles() == ["What is the capital of France?"]
    assert page.inner_text("#chat-title") == "What is the capital of France?"


def stop_reply(chat: ChatPage, how: str) -> float:
    """Clicks Stop (or presses Esc); returns time.monotonic() of the click."""
    clicked = time.monotonic()
    if how == "escape key":
        chat.page.keyboard.press("Escape")
    else:
        chat.page.click("#send")
    return clicked


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
    page.wait_for_function("() => /[1-9] busy/.test(document.getElementById('status-text').textContent)")
    chat.shot(tmp_path / "streaming.png")

    cancels: list[Any] = []
    page.on("response", lambda r: cancels.append(r) if r.url.endswith("/chat/cancel") else None)
    clicked = stop_reply(chat, how)

    wait_idle(pid, within=3.0)  # the model stopped computing: the point of Stop
    # The cancel POST for the init's request id, answered by the server; the server's own
    # `done` then ends the stream (it says where the model stopped), so nothing is aborted.
    chat.wait_until(lambda: bool(cancels), what="POST /chat/cancel in the network log")
    cancel = cancels[0]
    assert cancel.request.post_data_json == {"request_id": request_id}
    assert cancel.status == 200
    assert cancel.json() == {"status": "cancelled", "request_id": request_id}

    chat.wait_reply_state("stopped", timeout=5_000)
    chat.status_busy_within(1.0, since=clicked)  # refreshed right after the stop, not 4 s later
    reply = chat.reply()
    kept = reply.locator(".body").inner_text()
    tokens = int(reply.get_attribute("data-tokens") or 0)
    assert kept.strip() and tokens >= 5
    assert reply.locator(".state").inner_text() == f"stopped after {tokens} tokens"
    assert page.inner_text("#send") == "Send"
    said = [line for line in chat.console if line.startswith(f"Request {request_id} stopped, said the server")]
    assert said, chat.console
    # The tier, when the server sends one (`stopped_by`), is shown in small print.
    tier = re.search(r"stopped_by: ([\w ]+)\)", said[0]).group(1)
    meta = reply.locator(".meta").inner_text()
    if tier == "not sent":
        assert "stop tier" not in meta, meta
    else:
        assert tier in ("token", "native", "chunk", "kill") and f"stop tier: {tier}" in meta, (tier, meta)
    assert stream.request.failure is None  # ended by `done`, not by an abort
    chat.wait_until(lambda: f"Cancelled request {request_id} on server (cancelled)" in chat.console, what="the cancel log")
    stored = chat.stored()[-1]
    assert stored["state"] == "stopped" and stored["content"].strip() == kept.strip()
    assert stored["stopNote"] == f"after {tokens} tokens"
    chat.wait_until(lambda: service.health()["active_requests"] == 0, what="the server's bookkeeping to empty")
    chat.shot(tmp_path / "stopped.png")


def test_stop_drops_the_connection_when_the_cancel_cannot_be_sent(
    service: Service, open_chat: Callable[..., ChatPage]
) -> None:
    """The other half of Stop: a failed cancel POST (here refused by the browser) makes the page
    abort the stream at once, and the server treats the disconnect as a cancel."""
    chat = open_chat(service)
    page = chat.page
    page.select_option("#mode", "long")
    page.route("**/chat/cancel", lambda route: route.abort())
    with page.expect_response(is_stream) as stream_info:
        chat.send(COUNTING)
    stream = stream_info.value
    pid = service.worker_for(stream.headers["x-request-id"])
    chat.wait_tokens(5)
    wait_busy(pid, cpu=0.2)
    page.click("#send")
    wait_idle(pid, within=3.0)
    chat.wait_until(lambda: stream.request.failure is not None, what="the stream fetch to be aborted")
    assert stream.request.failure == "net::ERR_ABORTED"
    chat.wait_reply_state("stopped", timeout=5_000)
    tokens = int(chat.reply().get_attribute("data-tokens") or 0)
    assert chat.reply().locator(".state").inner_text() == f"stopped after {tokens} tokens"
    assert any("Cancel of request" in line and "failed" in line for line in chat.console), chat.console
    chat.wait_until(lambda: service.health()["active_requests"] == 0, what="the server's bookkeeping to empty")


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
    svc = make_service({"pool": {**ONE_SEQUENCE, "prefill_chunk": 128}})  # small chunks: progress comes soon
    blocker = Stream(svc.url, {"message": COUNTING, "mode": "long"})  # takes the only worker
    blocker.wait_for("token")
    chat = open_chat(svc)
    page = chat.page
    page.select_option("#mode", "long")
    with page.expect_response(is_stream) as stream_info:
        chat.send(long_prompt(1500))
    request_id = stream_info.value.headers["x-request-id"]
    chat.wait_state_text(r"^queued, position 1$")
    chat.shot(tmp_path / "queued.png")

    svc.cancel(blocker.request_id)
    chat.wait_state_text(r"^reading prompt \d+ %$", timeout=60_000)
    # A lost worker's request is resumed once on a replacement (docs/design.md), so the worker
    # running it is killed each time it shows up until the page reports the failure.
    killed: set[int] = set()
    deadline = time.monotonic() + 90
    while chat.reply().get_attribute("data-state") != "error":
        assert time.monotonic() < deadline and len(killed) <= 2, f"no error after killing {killed}"
        running = [w["pid"] for w in svc.health(verbose=True)["worker_details"]
                   if request_id in (w.get("request_ids") or [w.get("request_id")]) and w["pid"] not in killed]
        for pid in running:
            svc.known_pids.add(pid)
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        page.wait_for_timeout(50)
    state = chat.reply().locator(".state").inner_text()
    assert state.startswith("Error:") and "died" in state, state
    assert chat.stored()[-1]["state"] == "error"
    chat.shot(tmp_path / "error.png")


def test_stop_in_a_queue_says_so(make_service: Callable[..., Service], open_chat: Callable[..., ChatPage]) -> None:
    svc = make_service({"pool": ONE_SEQUENCE})
    blocker = Stream(svc.url, {"message": COUNTING, "mode": "long"})  # takes the only worker
    blocker.wait_for("token")
    chat = open_chat(svc)
    chat.page.select_option("#mode", "long")
    chat.send("Hello")
    chat.wait_state_text(r"^queued, position 1$")
    chat.page.click("#send")
    chat.wait_reply_state("stopped", timeout=5_000)
    assert chat.reply().locator(".state").inner_text() == "stopped while waiting in the queue"
    assert svc.health()["queue"] == 0
    svc.cancel(blocker.request_id)


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
    # The change is announced once, politely; the status line itself is not a live region.
    page.wait_for_function("() => document.getElementById('announce').textContent.startsWith('Server problem')")


XSS_ATTACKS = [
    '<script>window.__xss = "script"</script>',
    '<img src=x onerror="window.__xss = \'img\'">',
    "[click me](javascript:window.__xss='link')",
    "[also me](JaVaScRiPt:window.__xss='link2' \"title\")",
    "<a href=\"javascript:window.__xss='rawlink'\">raw link</a>",
    "![pic](http://127.0.0.1:9/tracker.png)",
    "![pic2](javascript:window.__xss='imglink')",
    "<iframe src=\"javascript:window.__xss='iframe'\"></iframe>",
    "<svg onload=\"window.__xss='svg'\"></svg>",
    "<details open ontoggle=\"window.__xss='details'\">x</details>",
    "[data](data:text/html,<script>parent.__xss='data'</script>)",
]


def test_markup_in_model_output_and_history_is_inert(service: Service, open_chat: Callable[..., ChatPage]) -> None:
    chat = open_chat(service)
    page = chat.page
    images: list[str] = []
    page.on("request", lambda r: images.append(r.url) if "tracker" in r.url else None)
    chat.preload([
        {"role": "user", "content": XSS_ATTACKS[0], "state": "done"},
        {"role": "assistant", "content": "Sure:\n\n" + "\n\n".join(XSS_ATTACKS), "state": "done", "mode": "chat"},
    ])

    # A crafted reply: markup split across tokens, then a code block.
    tokens = ["<img src=x ", 'onerror="window.__xss = \'token\'">', " and ", "<b>bold</b>\n\n```\n", "<i>code</i>\n```",
              "\n\n[x](javascript:window.__xss='streamed')"]
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
    for markup in [XSS_ATTACKS[0], XSS_ATTACKS[1], '<img src=x onerror="window.__xss = \'token\'">', "<b>bold</b>",
                   "<i>code</i>", XSS_ATTACKS[4], XSS_ATTACKS[7], XSS_ATTACKS[8]]:
        assert markup in log_text, markup  # raw HTML is shown as text
    dangerous = "#log img, #log script, #log iframe, #log svg, #log details, #log b, #log i, #log [onerror], #log [onload]"
    assert page.locator(dangerous).count() == 0
    hrefs = page.eval_on_selector_all("#log a", "as => as.map(a => a.getAttribute('href'))")
    # The image became a plain link; javascript: and data: links lost their URL.
    assert [h for h in hrefs if h] == ["http://127.0.0.1:9/tracker.png"], hrefs
    assert hrefs.count(None) >= 4 and page.locator("#log a.dead-link").count() == hrefs.count(None)
    assert page.get_attribute("#log a[href]", "rel") == "noopener noreferrer nofollow"
    assert page.locator(".msg.assistant:last-of-type pre code").inner_text().strip() == "<i>code</i>"
    for link in page.locator("#log a.dead-link").all():  # clicking a neutered link runs nothing either
        link.click()
    page.wait_for_timeout(300)  # an injected handler would have fired by now
    assert page.evaluate("window.__xss") is None
    assert images == []  # no image was fetched by itself


def test_phone_screen_dark_scheme_and_keyboard(service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path) -> None:
    chat = open_chat(service, viewport={"width": 360, "height": 640}, color_scheme="dark", is_mobile=True, has_touch=True)
    page = chat.page
    chat.preload([{"role": "user", "content": "a" * 300, "state": "done"},
                  {"role": "assistant", "content": "word " * 80, "state": "stopped", "mode": "long",
                   "stopNote": "after 80 tokens"}])
    page.wait_for_selector(".msg.assistant[data-state=stopped]")

    assert page.evaluate("document.documentElement.scrollWidth") <= 360, "the page scrolls sideways"
    for selector in ("#input", "#send", "#mode", "#sidebar-toggle"):
        box = page.locator(selector).bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= 360 and box["y"] + box["height"] <= 640, selector
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert sum(int(c) for c in background[background.index("(") + 1 : -1].split(",")[:3]) < 3 * 80, background
    assert not page.locator("#new-chat").is_visible()  # the list is folded away on a phone
    chat.shot(tmp_path / "phone-dark.png", "chat-phone-dark.png")

    # The list opens over the chat and closes with Esc, focus back on its button.
    page.click("#sidebar-toggle")
    page.wait_for_selector("#new-chat", state="visible")
    assert page.get_attribute("#sidebar-toggle", "aria-expanded") == "true"
    assert chat.titles() == ["a" * 59 + "…"]
    page.wait_for_function("() => getComputedStyle(document.getElementById('sidebar')).transform === 'none'")  # slid in
    chat.shot(tmp_path / "phone-list.png", "chat-phone-list.png")
    page.keyboard.press("Escape")
    page.wait_for_selector("#new-chat", state="hidden")
    assert page.evaluate("document.activeElement.id") == "sidebar-toggle"

    # Keyboard: Tab from the mode reaches the export buttons, each message's buttons, the
    # input and Send; Shift+Enter is a newline, not a send.
    page.locator("#mode").focus()
    order = []
    for _ in range(8):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.className"))
    # Chromium also stops on the scrollable conversation ("log"), which lets it scroll by keys.
    assert [i for i in order if i != "log"][:5] == ["export-md", "export-json", "edit quiet small",
                                                      "copy-reply quiet small", "regenerate quiet small"], order
    assert order.index("input") < order.index("send"), order
    page.locator("#input").focus()
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("line two")
    assert page.input_value("#input") == "line one\nline two"
    assert page.locator(".msg").count() == 2


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
    assert chat.reply().locator(".body").inner_text().strip()
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

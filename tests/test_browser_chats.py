"""The conversation list of the chat page, in a real Chromium against the real service: create,
switch, rename, delete with undo, search, survive a reload, export and import, and the old
single conversation migrated into the list."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import Service
from tests.test_browser import (  # noqa: F401 - fixtures
    CHROMIUM, INDEX_KEY, MESSAGES_PREFIX, OLD_STORAGE_KEY, ChatPage, browser, open_chat, sync_api,
)

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: run scripts/install-browser.sh as root"),
]


def ask(chat: ChatPage, text: str) -> None:
    chat.send(text)
    chat.wait_reply_state("done", timeout=60_000)


def conv(chat: ChatPage, title: str) -> Any:
    return chat.page.locator("#conversations .conv", has=chat.page.locator(".conv-title", has_text=title))


def test_conversations_are_created_switched_renamed_searched_and_kept(
    service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    chat = open_chat(service)
    page = chat.page
    page.select_option("#mode", "brief")
    ask(chat, "Hello there")
    assert chat.titles() == ["Hello there"]

    page.click("#new-chat")  # the first one stays in the list
    assert page.locator("#log .msg").count() == 0 and page.is_visible("#empty")
    assert page.evaluate("document.activeElement.id") == "input"
    ask(chat, "What is the capital of France?")
    assert chat.titles() == ["What is the capital of France?", "Hello there"]  # newest first
    assert conv(chat, "capital").get_attribute("aria-current") == "true"
    assert conv(chat, "capital").locator(".conv-open").get_attribute("aria-current") == "true"
    assert conv(chat, "Hello there").locator(".conv-open").get_attribute("aria-current") is None
    page.click("#new-chat")
    page.click("#new-chat")  # an empty new chat is not saved, nor doubled
    assert len(chat.titles()) == 2

    # Switch: the other conversation's messages, and its history goes with the next message.
    conv(chat, "Hello there").locator(".conv-open").click()
    assert page.locator("#log .msg.user .body").all_inner_texts()[0] == "Hello there"
    with page.expect_request(lambda r: r.url.endswith("/chat/stream")) as request_info:
        chat.send("Again")
    assert [m["content"] for m in request_info.value.post_data_json["history"]][0] == "Hello there"
    chat.wait_reply_state("done", timeout=60_000)
    assert chat.titles()[0] == "Hello there"  # the most recently used is on top

    # Rename: Enter keeps it, Esc does not.
    conv(chat, "Hello there").locator(".conv-rename").click()
    page.fill(".rename-input", "Greetings")
    chat.shot(tmp_path / "rename.png", "chat-rename.png")
    page.press(".rename-input", "Enter")
    assert chat.titles()[0] == "Greetings" and page.inner_text("#chat-title") == "Greetings"
    assert page.title() == "Greetings · Edison"
    conv(chat, "Greetings").locator(".conv-rename").click()
    page.fill(".rename-input", "Not this")
    page.press(".rename-input", "Escape")
    assert chat.titles()[0] == "Greetings"
    assert page.locator("#log .msg").count() == 4  # Esc in the name field stopped nothing, cleared nothing

    # Search by text in any message, not only the title.
    page.fill("#search", "AGAIN")  # in a message of "Greetings", not in its title
    page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 1")
    assert chat.titles() == ["Greetings"]
    assert page.inner_text("#conversations .conv-snippet") == "Again"
    assert page.inner_text("#search-count") == "1 of 2 conversations match"
    chat.shot(tmp_path / "search.png", "chat-search.png")
    page.fill("#search", "no such words anywhere")
    page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 0")
    assert page.inner_text("#search-count") == "0 of 2 conversations match"
    page.fill("#search", "")

    # A reload keeps the list, the names and the open conversation.
    page.reload()
    page.wait_for_selector("#mode:not([disabled])")
    assert chat.titles() == ["Greetings", "What is the capital of France?"]
    assert conv(chat, "Greetings").get_attribute("aria-current") == "true"
    assert page.locator("#log .msg").count() == 4
    assert sorted(c["title"] for c in chat.index()) == ["Greetings", "What is the capital of France?"]
    chat.shot(tmp_path / "list.png", "chat-list.png")


def test_delete_can_be_undone_and_then_is_final(service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path) -> None:
    chat = open_chat(service)
    page = chat.page
    chat.preload([{"role": "user", "content": "First chat", "state": "done"},
                  {"role": "assistant", "content": "One", "state": "done"}])
    chat.preload([{"role": "user", "content": "Second chat", "state": "done"},
                  {"role": "assistant", "content": "Two", "state": "done"}])
    assert chat.titles() == ["Second chat", "First chat"]
    second_id = conv(chat, "Second chat").get_attribute("data-id")

    conv(chat, "Second chat").locator(".conv-delete").click()  # the open one: the next opens
    assert chat.titles() == ["First chat"]
    assert page.inner_text("#log .msg.user .body") == "First chat"
    page.wait_for_selector("#toast:not([hidden])")
    assert page.inner_text("#toast-text") == "Deleted “Second chat”."
    assert page.evaluate(f"localStorage.getItem({MESSAGES_PREFIX + second_id!r})") is None
    chat.shot(tmp_path / "deleted.png", "chat-delete-undo.png")
    page.click("#toast-undo")
    assert chat.titles() == ["Second chat", "First chat"]
    assert page.inner_text("#log .msg.assistant .body") == "Two"  # open again, as before
    assert json.loads(page.evaluate(f"localStorage.getItem({MESSAGES_PREFIX + second_id!r})"))[1]["content"] == "Two"
    assert page.is_hidden("#toast")

    conv(chat, "First chat").locator(".conv-delete").click()
    page.reload()  # no undo: gone for good
    page.wait_for_selector("#mode:not([disabled])")
    assert chat.titles() == ["Second chat"]
    assert [c["title"] for c in chat.index()] == ["Second chat"]


def test_export_and_import_round_trip_json_and_markdown(
    service: Service, open_chat: Callable[..., ChatPage], tmp_path: Path
) -> None:
    chat = open_chat(service, accept_downloads=True)
    page = chat.page
    messages = [
        {"role": "user", "content": "Give me a list", "state": "done"},
        {"role": "assistant", "content": "- one\n- two\n\n```python\nprint(1)\n```", "state": "done", "mode": "chat"},
        {"role": "user", "content": "And a number", "state": "done"},
        {"role": "assistant", "content": "4", "state": "stopped", "mode": "long", "stopNote": "after 1 token"},
    ]
    chat.preload(messages)

    with page.expect_download() as info:
        page.click("#export-json")
    assert info.value.suggested_filename == "edison-give-me-a-list.json"
    exported = json.loads(Path(info.value.path()).read_text())
    assert exported["format"] == "edison.conversations" and len(exported["conversations"]) == 1
    assert [(m["role"], m["content"], m["state"]) for m in exported["conversations"][0]["messages"]] == [
        (m["role"], m["content"], m["state"]) for m in messages
    ]
    with page.expect_download() as info:
        page.click("#export-md")
    markdown = Path(info.value.path()).read_text()
    assert markdown.startswith("# Give me a list\n\n## You\n\nGive me a list\n\n## Edison\n\n- one\n- two\n")
    assert "## Edison\n\n4\n\n_(stopped)_\n" in markdown
    with page.expect_download() as info:
        page.click("#export-all")
    assert info.value.suggested_filename == "edison-conversations.json"

    # Import both into a fresh browser: the same conversations come back.
    other = open_chat(service)
    json_file = tmp_path / "export.json"
    json_file.write_text(json.dumps(exported))
    md_file = tmp_path / "export.md"
    md_file.write_text(markdown.replace("# Give me a list", "# From Markdown"))
    other.page.set_input_files("#import-file", str(json_file))
    other.page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 1")
    assert "Imported 1 conversation from export.json." in other.page.inner_text("#toast-text")
    other.page.set_input_files("#import-file", str(md_file))
    other.page.wait_for_function("() => document.querySelectorAll('#conversations .conv').length === 2")
    assert other.titles() == ["From Markdown", "Give me a list"]
    imported = other.stored()  # the Markdown one, now open
    assert [(m["role"], m["content"], m["state"]) for m in imported] == [
        (m["role"], m["content"], m["state"]) for m in messages
    ]
    assert other.page.locator("#log .codeblock .lang").inner_text() == "python"

    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    other.page.set_input_files("#import-file", str(bad))
    other.page.wait_for_function("() => document.getElementById('toast-text').textContent.startsWith('Could not import bad.json')")
    assert len(other.titles()) == 2


def test_the_old_single_conversation_moves_into_the_list(service: Service, open_chat: Callable[..., ChatPage]) -> None:
    chat = open_chat(service)
    page = chat.page
    old = [{"role": "user", "content": "From the old page", "state": "done"},
           {"role": "assistant", "content": "Kept", "state": "stopped", "mode": "long"},
           {"role": "bogus", "content": "dropped"}]
    page.evaluate("([k, v]) => localStorage.setItem(k, v)", [OLD_STORAGE_KEY, json.dumps(old)])
    page.reload()
    page.wait_for_selector(".msg.assistant[data-state=stopped]")
    assert chat.titles() == ["From the old page"]
    assert [m["content"] for m in chat.stored()] == ["From the old page", "Kept"]
    assert page.evaluate(f"localStorage.getItem({OLD_STORAGE_KEY!r})") is None  # moved, not copied
    assert any("Migrated the old conversation (2 messages)" in line for line in chat.console)
    page.reload()  # once only
    page.wait_for_selector("#mode:not([disabled])")
    assert chat.titles() == ["From the old page"]
    assert len(json.loads(page.evaluate(f"localStorage.getItem({INDEX_KEY!r})"))) == 1

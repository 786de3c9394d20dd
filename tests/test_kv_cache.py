"""Conversations that come back: a history's KV cache is saved outside the worker (edison/kvstore.py)
and restored, after its slot went to another conversation, after its worker was SIGKILLed, and
after the service restarted; a damaged entry, one from another model and a full budget are each
dropped, logged and answered from scratch; what an older Edison saved is deleted. One slot per
worker, so each new conversation takes the slot from the last one. Replies are checked as counts
(tests/support.py), never as text."""

from __future__ import annotations

import json
import os
import signal
import struct
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.support import Service, Stream, chat, consecutive, wait_idle

pytestmark = pytest.mark.timeout(240)

MakeService = Callable[..., Service]
ONE_SLOT = {"pool": {"workers": 1, "slots": 1}}


def count_to(n: int, name: str = "") -> str:
    return f"{name} counts: " * bool(name) + ", ".join(str(i) for i in range(1, n + 1)) + ","


class Conversation:
    def __init__(self, svc: Service, name: str, first: str | None = None) -> None:
        self.svc, self.history = svc, []
        self.next = first or count_to(40, name)

    def turn(self) -> dict:
        """One turn (its whole 64-token budget, counting on), and the history grows by it."""
        done = chat(self.svc.url, self.next, mode="count", history=self.history)[-1].data
        assert done["ok"] is True and done["usage"]["completion_tokens"] == 64, done
        assert consecutive(done["response"]), done["response"]
        self.history += [{"role": "user", "content": self.next}, {"role": "assistant", "content": done["response"]}]
        self.next = "Go on: 1, 2, 3,"
        return done["usage"]


def saved_tokens(path: Path) -> int:
    """How many tokens an entry holds, from its header (8-byte magic, format, JSON length, JSON)."""
    data = path.read_bytes()
    (length,) = struct.unpack_from("<I", data, 12)
    return json.loads(data[16 : 16 + length])["n_tokens"]


def entries(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.kv"))


def kv_dirs(svc: Service) -> tuple[Path, Path]:
    stem = svc.config.parent / svc.config.stem
    return Path(f"{stem}-kv-ram"), Path(f"{stem}-kv-disk")


def metric(svc: Service, line_start: str) -> float:
    text = httpx.get(f"{svc.url}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start))


def test_a_conversation_whose_slot_was_taken_restores_its_history_from_ram(make_service: MakeService) -> None:
    svc = make_service(ONE_SLOT)
    ann, bob = Conversation(svc, "Ann"), Conversation(svc, "Bob")
    first = ann.turn()
    assert first["cached_tokens"] == 0
    bob.turn()  # takes the only slot: Ann's KV goes to the store
    again = ann.turn()
    assert again["cached_from"] == "ram", again
    assert again["cached_tokens"] >= first["prompt_tokens"] - 2, (again, first)  # only the new words read
    assert metric(svc, 'edison_kv_cache_lookups_total{result="ram"}') >= 1
    ram = svc.health(verbose=True)["kv_cache"]["ram"]
    assert ram["entries"] >= 1 and 0 < ram["bytes"] <= ram["budget_bytes"]


def test_a_killed_workers_request_resumes_from_its_saved_prompt(make_service: MakeService) -> None:
    svc = make_service({"pool": {"workers": 1, "slots": 2}})
    stream = Stream(svc.url, {"message": count_to(500), "mode": "count"})  # ~1,900 prompt tokens
    stream.wait_for("token", count=5)
    pid = svc.worker_for(stream.request_id)
    os.kill(pid, signal.SIGKILL)
    done = stream.done.data
    assert done["ok"] is True and done["usage"]["completion_tokens"] == 64, done
    assert consecutive(stream.text()) and done["response"] == stream.text(), stream.text()  # no seam
    usage = done["usage"]
    assert usage["cached_from"] == "ram", usage
    assert usage["prompt_tokens"] - usage["cached_tokens"] < usage["prompt_tokens"] / 10, usage  # under 10 % read again
    assert f"Resuming request {stream.request_id}" in svc.log()


def test_a_restarted_service_restores_a_conversation_from_disk(make_service: MakeService) -> None:
    # No RAM tier: what a reboot leaves. Saves of 16 new tokens or more: the 63 of a reply count.
    svc = make_service({**ONE_SLOT, "kv_cache": {"ram_mib": 0, "min_tokens": 16}})
    ann = Conversation(svc, "Ann")
    first = ann.turn()
    svc.stop()  # a clean exit: the worker saves what its slot holds and waits for the disk writes
    saved = [saved_tokens(path) for path in entries(kv_dirs(svc)[1])]
    assert saved and max(saved) > first["prompt_tokens"], saved  # its reply too, not only the prompt
    ann.svc = again_svc = Service(svc.config, svc.log_path).start()
    try:
        again = ann.turn()
        assert again["cached_from"] == "disk", again
        assert again["cached_tokens"] >= first["prompt_tokens"] - 2, (again, first)
    finally:
        again_svc.stop()


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "corrupt":
        data[-100] ^= 0xFF  # inside the state: the CRC no longer matches
    elif how == "truncated":
        data = data[: len(data) // 2]
    else:  # another model: the header names another identity (a hex digest of the same length)
        marker = data.index(b'"identity": "') + len(b'"identity": "')
        data[marker : marker + 8] = b"00000000" if data[marker : marker + 8] != b"00000000" else b"11111111"
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["corrupt", "truncated", "another model"])
def test_a_damaged_entry_is_dropped_logged_and_answered_from_scratch(make_service: MakeService, how: str) -> None:
    svc = make_service({**ONE_SLOT, "kv_cache": {"disk_mib": 0}})  # one copy of each entry, in RAM
    ann, bob = Conversation(svc, "Ann"), Conversation(svc, "Bob")
    ann.turn()
    bob.turn()
    saved = entries(kv_dirs(svc)[0])
    assert saved
    for path in saved:
        damage(path, how)
    again = ann.turn()  # answered whole from scratch
    assert again["cached_from"] in ("", "slot"), again
    dropped = [Path(line.split("Dropped the saved KV cache ")[1].split(": ")[0])
               for line in svc.log().splitlines() if "Dropped the saved KV cache" in line]
    assert dropped and set(dropped) <= set(saved), (dropped, saved)  # Ann's, found when she came back
    assert not any(path.exists() for path in dropped)
    assert svc.health()["status"] == "ok"


def test_budgets_hold_and_a_tier_that_cannot_be_written_is_turned_off(make_service: MakeService, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    # A saved state of these conversations is 2.8-3.2 MiB: two fit in 7 MiB, three do not.
    svc = make_service({**ONE_SLOT, "kv_cache": {"ram_mib": 7, "disk_dir": str(not_a_dir / "kv")}})
    ann, bob, cyd = (Conversation(svc, name) for name in ("Ann", "Bob", "Cyd"))
    for conversation in (ann, bob, cyd):
        conversation.turn()  # each takes the slot from the one before, which is saved
    ram = svc.health(verbose=True)["kv_cache"]["ram"]
    assert 0 < ram["bytes"] <= ram["budget_bytes"] == 7 << 20, ram
    assert bob.turn()["cached_from"] == "ram"  # the most recently saved one is still there
    assert ann.turn()["cached_from"] != "ram"  # the least recently used one went first
    assert "cannot write to the disk tier" in svc.log()  # and every request was answered


def test_a_cancel_right_after_a_restore_begins_stops_within_the_prefill_bounds(make_service: MakeService) -> None:
    svc = make_service(ONE_SLOT)
    ann, bob = Conversation(svc, "Ann", count_to(300, "Ann")), Conversation(svc, "Bob")
    ann.turn()
    bob.turn()
    pid = svc.worker_pids()[0]
    stream = Stream(svc.url, {"message": "Go on: 1, 2, 3,", "mode": "long", "history": ann.history})
    stream.wait_for("init")
    cancelled_at = time.monotonic()
    assert svc.cancel(stream.request_id)["status"] == "cancelled"
    done = stream.done
    assert done.data["stopped"] is True and done.at - cancelled_at < 0.5, done.data
    wait_idle(pid, within=3.0)
    assert svc.worker_pids() == [pid]  # the flag stopped it, not the kill tier
    assert ann.turn()["cached_from"] in ("slot", "ram")


def test_older_format_entries_are_deleted_at_start_others_kept(make_service: MakeService) -> None:
    """An upgrade changes the entries' format, so their identity's directory is never read again:
    such directories are deleted when the model loads, or they would hold tmpfs RAM until a
    reboot. A directory of this format (another model's) stays, and so does a stranger's file."""
    svc = make_service(ONE_SLOT)
    ann = Conversation(svc, "Ann")
    ann.turn()
    ours = entries(kv_dirs(svc)[0])
    assert ours
    parent = ours[0].parent.parent  # <ram_dir>/edison-kv-<uid>, one directory per identity
    header = json.dumps({"identity": "0" * 64, "n_tokens": 0, "state_bytes": 0, "crc32": 0}).encode()
    old, other = parent / "0123456789abcdef", parent / "fedcba9876543210"
    for directory, fmt in ((old, 1), (other, ours[0].read_bytes()[8])):
        directory.mkdir()
        (directory / "a.kv").write_bytes(struct.pack("<8sII", b"EDISONKV", fmt, len(header)) + header)
    (old / "notes.txt").write_text("not Edison's")
    svc.stop()
    ann.svc = svc = Service(svc.config, svc.log_path).start()
    try:
        assert not (old / "a.kv").exists() and (old / "notes.txt").exists(), list(old.iterdir())
        assert (other / "a.kv").exists()
        assert ann.turn()["cached_from"] == "ram"  # its own entries were kept too
    finally:
        svc.stop()

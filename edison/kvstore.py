"""Saved KV caches, outside the worker process: a conversation that comes back after its slot was
taken, after its worker was killed, or after the service restarted, restores its history's KV
cache instead of reading it again.

An entry is one file: a header (format, the identity of the model and context it was made
with, its tokens, a CRC of the state) and the bytes of `llama_state_seq_get_data` for one
sequence. Two tiers, each a directory with a budget: RAM (tmpfs: a SIGKILLed worker loses
nothing, and a restarted service still finds it) and disk under the cache directory (survives a
reboot). A save goes to RAM at once and to disk behind it, on a thread; the least recently used
entry goes first when a tier is over budget. Every worker of the pool shares the directories;
files are written beside their final name and renamed, so a reader never sees half an entry.

Pure Python (no llama_cpp): the web process reads the tiers' use from here too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import stat
import struct
import threading
import zlib
from array import array
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edison.model import cache_dir
from edison.settings import Settings

logger = logging.getLogger("edison.kvstore")

FORMAT = 2  # 2: the header says from which position the sliding-window layers hold the state
MAGIC = b"EDISONKV"
_HEAD = struct.Struct("<8sII")  # magic, format, header JSON length
SUFFIX = ".kv"


def identity(settings: Settings, model_path: str) -> str:
    """What a saved state is valid for: the model file (its size and a hash of its first 4 MiB,
    computed once per process), the settings that shape the KV cache, llama.cpp's version and
    this file format. Any change makes every older entry a miss."""
    size = os.path.getsize(model_path)
    with open(model_path, "rb") as f:
        head = hashlib.sha256(f.read(4 << 20)).hexdigest()
    try:
        llama = version("llama-cpp-python")
    except PackageNotFoundError:
        llama = "unknown"
    m = settings.model
    layout = {"n_ctx": m.n_ctx, "flash_attn": m.flash_attn, "kv_type": "f16", "swa_full": m.swa_full,
              "kv_unified": False}
    text = json.dumps({"format": FORMAT, "model": [size, head], "layout": layout, "llama": llama}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Entry:
    path: Path
    tier: str
    tokens: array  # 'i': the token ids whose KV the entry holds
    first: int = 0  # its sliding-window layers hold positions from here on (0: every one)


def kept_prefix(shared: int, wanted: int, first: int, window: int) -> int:
    """How many tokens a prompt of `wanted` tokens can keep of a KV sequence (in a slot, or a
    saved state) that shares `shared` with it and whose sliding-window layers hold positions
    from `first` on; 0: none.

    Never the last token (read again, for fresh logits). And the token after the kept ones must
    find its whole window there: the `window` - 1 positions before it (a standard window, mask
    `query - key >= window`; a chunked or symmetric one needs fewer). llama.cpp keeps a window
    layer's positions contiguous, from `seq_pos_min` on. A history that grows always passes; a
    prompt that goes back further than the cache's slack (an edited message, a long reply
    regenerated) keeps nothing of that sequence.
    """
    keep = min(shared, wanted - 1)
    return keep if keep > 0 and first <= max(0, keep - window + 1) else 0


class Tier:
    def __init__(self, name: str, directory: Path, budget: int) -> None:
        self.name, self.directory, self.budget = name, directory, budget
        self.index: dict[str, Entry] = {}  # by file name
        self.broken = False  # a write failed (a full disk): no more writes from this process

    def scan(self, ident: str) -> list[Entry]:
        """The tier's entries, their headers read once per file (other workers add and remove)."""
        found = self._listing()
        names = {e.name: e for e in found if e.name.endswith(SUFFIX)}
        for e in found:  # half-written by a process that died while writing ("<key>.<pid>.partial")
            pid = e.name.split(".")[-2] if e.name.endswith(".partial") else ""
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                remove(Path(e.path))
        for gone in self.index.keys() - names.keys():
            del self.index[gone]
        for name in names.keys() - self.index.keys():
            path = self.directory / name
            found = read_tokens(path, ident)
            if found is not None:
                self.index[name] = Entry(path, self.name, *found)
        return list(self.index.values())

    def used(self) -> tuple[int, int]:
        """(entries, bytes) on disk now, whoever wrote them."""
        sizes = [size for _, size, _ in self._files()]
        return len(sizes), sum(sizes)

    def trim(self, keep: Path | None = None) -> None:
        """Least recently used first (a hit touches its file), until the tier fits its budget."""
        files = self._files()
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total <= self.budget:
                break
            if path != keep:
                remove(path)
                total -= size

    def _listing(self) -> list[os.DirEntry[str]]:
        try:
            return list(os.scandir(self.directory))
        except OSError:  # not there yet, or not a directory at all: an empty tier
            return []

    def _files(self) -> list[tuple[float, int, Path]]:
        """(mtime, size, path) of every entry; one that vanishes meanwhile (another worker) is skipped."""
        files = []
        for e in self._listing():
            if e.name.endswith(SUFFIX):
                try:
                    st = e.stat()
                except OSError:
                    continue
                files.append((st.st_mtime, st.st_size, Path(e.path)))
        return files


def read_tokens(path: Path, ident: str) -> tuple[array, int] | None:
    """The tokens of a valid entry of this identity, and its first position; anything else is
    dropped with one log line."""
    try:
        with open(path, "rb") as f:
            header = _read_header(f, ident)
            tokens = array("i")
            tokens.frombytes(f.read(4 * header["n_tokens"]))
        if len(tokens) != header["n_tokens"] or path.stat().st_size != _size(header):
            raise ValueError("truncated")
        return tokens, int(header["first"])
    except FileNotFoundError:
        return None  # another worker evicted it
    except (OSError, ValueError, KeyError, TypeError) as exc:
        drop(path, exc)
        return None


def _read_header(f: Any, ident: str) -> dict[str, Any]:
    magic, fmt, length = _HEAD.unpack(f.read(_HEAD.size))
    if magic != MAGIC or fmt != FORMAT:
        raise ValueError(f"not an Edison KV entry of format {FORMAT}")
    header = json.loads(f.read(length))
    header["header_bytes"] = _HEAD.size + length
    if header["identity"] != ident:
        raise ValueError("made with another model file or context settings")
    return header


def _size(header: dict[str, Any]) -> int:
    return header["header_bytes"] + 4 * header["n_tokens"] + header["state_bytes"]


def private_directory(directory: Path) -> None:
    """Creates the tier's directory and its parent for this user only (a saved state holds a
    conversation's tokens), and refuses one that another user made or that is a link: /dev/shm
    is shared by every user of the machine."""
    directory.parent.parent.mkdir(parents=True, exist_ok=True)
    for path in (directory.parent, directory):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise PermissionError(f"{path} is not a directory of this user")
        if st.st_mode & 0o077:
            os.chmod(path, 0o700)


def drop(path: Path, why: object) -> None:
    logger.warning("Dropped the saved KV cache %s: %s", path, why)
    remove(path)


def remove(path: Path) -> None:
    """A cache file goes; one that is gone already, or cannot go, is not worth an error."""
    with contextlib.suppress(OSError):
        path.unlink()


def common_prefix(a: Any, b: Any) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class KVStore:
    """One per worker process (and one in the web process, to report the tiers' use)."""

    def __init__(self, tiers: list[Tier], ident: str, min_tokens: int, window: int = 0) -> None:
        self.tiers = [t for t in tiers if t.budget > 0]
        self.ident, self.min_tokens = ident, min_tokens
        self.window = window  # the model's sliding window, in tokens (0: none)
        self.pending: queue.Queue[tuple[Tier, bytes | Path, Entry] | None] = queue.Queue(maxsize=4)
        self.writer: threading.Thread | None = None

    @classmethod
    def open(cls, settings: Settings, model_path: str, window: int = 0) -> KVStore | None:
        kv = settings.kv_cache
        if kv.ram_mib <= 0 and kv.disk_mib <= 0:
            return None
        ident = identity(settings, model_path)
        return cls([Tier(name, directory / ident[:16], budget) for name, directory, budget in tier_places(settings)],
                   ident, kv.min_tokens, window)

    # Finding and reading.

    def lookup(self, tokens: list[int], beyond: int) -> tuple[Entry, int] | None:
        """The entry that lets `tokens` keep the most of their prefix (`kept_prefix`), if that
        is more than `beyond` tokens, and how many; RAM before disk when both give as much."""
        best: tuple[Entry, int] | None = None
        for tier in self.tiers:
            for entry in tier.scan(self.ident):
                keep = kept_prefix(common_prefix(entry.tokens, tokens), len(tokens), entry.first, self.window)
                if keep > beyond and (best is None or keep > best[1]):
                    best = (entry, keep)
        return best

    def load(self, entry: Entry) -> bytes | None:
        """The entry's state, checked against its CRC; None if it is gone or damaged (dropped)."""
        try:
            with open(entry.path, "rb") as f:
                header = _read_header(f, self.ident)
                f.seek(header["header_bytes"] + 4 * header["n_tokens"])
                state = f.read()
            if len(state) != header["state_bytes"] or zlib.crc32(state) != header["crc32"]:
                raise ValueError("truncated or corrupt (CRC mismatch)")
            os.utime(entry.path)  # most recently used
            return state
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.forget(entry, exc)
            return None

    def forget(self, entry: Entry, why: object) -> None:
        drop(entry.path, why)
        for tier in self.tiers:
            tier.index.pop(entry.path.name, None)

    # Saving.

    def save(self, tokens: list[int], state: bytes, first: int = 0) -> None:
        """Into the first tier now (a tmpfs write of a few MiB), into the others behind it.
        `first`: the first position the state's sliding-window layers hold."""
        if len(tokens) < self.min_tokens or not self.tiers:
            return
        token_bytes = array("i", tokens).tobytes()
        name = hashlib.sha256(token_bytes).hexdigest()[:32] + SUFFIX
        header = json.dumps({"identity": self.ident, "n_tokens": len(tokens), "state_bytes": len(state),
                             "crc32": zlib.crc32(state), "first": first}).encode()
        blob = _HEAD.pack(MAGIC, FORMAT, len(header)) + header + token_bytes
        ram = self.tiers[0] if self.tiers[0].name == "ram" else None
        made = Entry(Path(name), "", array("i", tokens), first)
        written = self._write(ram, blob + state, made) if ram else None
        for tier in self.tiers[1 if ram else 0:]:  # disk: written behind, never in the decode loop
            source: bytes | Path = written if written is not None else blob + state
            try:
                self.pending.put_nowait((tier, source, made))
            except queue.Full:
                logger.info("KV cache: the %s tier is behind; one save skipped there", tier.name)

    def _write(self, tier: Tier, data: bytes, made: Entry) -> Path | None:
        """`made`: the entry being written, its file name as its path."""
        if tier.broken:
            return None
        if len(data) > tier.budget:
            logger.info("KV cache: a state of %.1f MiB is larger than the %s tier's budget: not saved there",
                        len(data) / 2**20, tier.name)
            return None
        target = tier.directory / made.path.name
        partial = target.with_suffix(f".{os.getpid()}.partial")
        try:
            private_directory(tier.directory)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(partial, target)
        except OSError as exc:
            remove(partial)
            tier.broken = True
            logger.warning("KV cache: cannot write to the %s tier (%s): it is off for this process", tier.name, exc)
            return None
        self._drop_prefixes(tier, made)
        tier.trim(keep=target)
        return target

    def _drop_prefixes(self, tier: Tier, made: Entry) -> None:
        """An entry whose tokens the new one extends holds nothing the new one does not, unless
        the new one's sliding window has moved past it: then a prompt that ends where the old
        one does (a reply regenerated) still needs the old one."""
        for entry in tier.scan(self.ident):
            n = len(entry.tokens)
            extended = n <= len(made.tokens) and common_prefix(entry.tokens, made.tokens) == n
            if entry.path.name != made.path.name and extended and kept_prefix(n, n, made.first, self.window) == n - 1:
                remove(entry.path)
                tier.index.pop(entry.path.name, None)

    def sweep_older_formats(self) -> None:
        """Deletes what an older Edison saved: entries of another format sit in another
        identity's directory, which nothing reads any more, and would hold their tmpfs RAM until
        a reboot. A directory with any entry of this format (another model's) is left alone.
        Called by the web process once per model load, before its workers start."""
        for tier in self.tiers:
            for directory in _subdirectories(tier.directory.parent):
                if directory != tier.directory and _older_format(directory):
                    logger.info("KV cache: deleting %s, saved by an older Edison", directory)
                    for path in directory.iterdir():
                        if path.name.endswith((SUFFIX, ".partial")):  # its own files only
                            remove(path)
                    with contextlib.suppress(OSError):
                        directory.rmdir()  # only if nothing else was in it

    def start_writer(self) -> None:
        """The thread that writes behind: started with the worker's engine, so that a worker has
        the same threads from the start to the end (the soak counts them), and never in the web
        process, which only reads the tiers' use."""
        if self.writer is None and any(t.name != "ram" for t in self.tiers):
            self.writer = threading.Thread(target=self._write_behind, name="kv-write-behind", daemon=True)
            self.writer.start()

    def _write_behind(self) -> None:
        while (item := self.pending.get()) is not None:
            tier, source, made = item
            try:
                data = source.read_bytes() if isinstance(source, Path) else source
            except OSError:
                continue  # evicted from RAM before it got here
            self._write(tier, data, made)  # never raises: a failed write turns the tier off

    def flush(self, timeout: float = 30.0) -> None:
        """Waits for the writes behind (tests, and a clean shutdown)."""
        if self.writer is not None and self.writer.is_alive():
            self.pending.put(None, timeout=timeout)
            self.writer.join(timeout)

    # Reporting.

    def usage(self) -> dict[str, dict[str, int]]:
        out = {}
        for tier in self.tiers:
            entries, used = tier.used()
            out[tier.name] = {"entries": entries, "bytes": used, "budget_bytes": tier.budget}
        return out


def _subdirectories(parent: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _older_format(directory: Path) -> bool:
    """Every entry in it is an Edison entry of an older format (and there is one)."""
    formats = []
    for path in directory.glob(f"*{SUFFIX}"):
        try:
            with open(path, "rb") as f:
                magic, fmt, _ = _HEAD.unpack(f.read(_HEAD.size))
        except (OSError, struct.error):
            continue
        formats.append(fmt if magic == MAGIC else FORMAT)
    return bool(formats) and max(formats) < FORMAT


def tier_places(settings: Settings) -> list[tuple[str, Path, int]]:
    """(name, directory, budget in bytes) of each tier, before the identity's subdirectory."""
    kv = settings.kv_cache
    ram = Path(kv.ram_dir or "/dev/shm") / f"edison-kv-{os.getuid()}"
    disk = Path(kv.disk_dir).expanduser() if kv.disk_dir else cache_dir(settings.model) / "kv"
    return [("ram", ram, kv.ram_mib << 20), ("disk", disk, kv.disk_mib << 20)]

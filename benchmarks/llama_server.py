"""llama.cpp's own `llama-server`, built from the llama.cpp that llama-cpp-python vendors, so
that both run the same kernels on the same weights and only the servers differ.

The llama-cpp-python sdist of the installed version comes from PyPI (`pip download`), its
`vendor/llama.cpp` is built with cmake (Release, CPU, native flags minus AMX as in the
Makefile, static, no OpenSSL, no web UI: nothing is fetched at build time), and the binary is
cached in ~/.cache/edison/ beside the bundled model and the llama-cpp-python wheel, so every
checkout on the machine shares it. The first build takes 10-15 minutes on 2 cores.

    python -m benchmarks.llama_server      # build if missing, print the binary's path
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TextIO

# The Makefile builds llama-cpp-python with the same flags (see the comment there about AMX).
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if platform.machine() == "x86_64" else ""
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    f"-DCMAKE_C_FLAGS={NO_AMX}",
    f"-DCMAKE_CXX_FLAGS={NO_AMX}",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # ON would download the web UI at build time
]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edison"


def binary_path() -> Path:
    tag = "native-noamx" if NO_AMX else "native"
    return cache_dir() / f"llama-server-{version('llama-cpp-python')}-{tag}" / "llama-server"


def ensure_built(log: Path | None = None) -> Path:
    """The cached binary, built first if it is missing. Build output goes to `log` (or stderr)."""
    target = binary_path()
    if target.exists():
        return target
    cmake = _cmake()
    with tempfile.TemporaryDirectory(prefix="edison-llama-server-") as tmp, _output(log) as out:
        work = Path(tmp)
        source = _vendored_llama_cpp(work, out)
        build = work / "build"
        jobs = str(os.cpu_count() or 2)
        _run([cmake, "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], out)
        _run([cmake, "--build", str(build), "--target", "llama-server", "-j", jobs], out)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        shutil.copy2(build / "bin" / "llama-server", partial)
        partial.rename(target)  # atomic: a half-copied binary is never taken for a built one
    return target


def _cmake() -> str:
    """The bench extra's cmake (beside this Python), else the machine's."""
    found = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
    if found is None:
        raise RuntimeError("building llama-server needs cmake: pip install -e '.[bench]' brings it")
    return found


def _vendored_llama_cpp(work: Path, out: TextIO) -> Path:
    pinned = f"llama-cpp-python=={version('llama-cpp-python')}"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(work), pinned], out)
    [sdist] = work.glob("llama_cpp_python-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    [source] = work.glob("llama_cpp_python-*/vendor/llama.cpp")
    return source


def _run(argv: list[str], out: TextIO) -> None:
    print(f"$ {' '.join(argv)}", file=out, flush=True)
    subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=True)


@contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    """A log file opened for appending, or stderr."""
    if path is None:
        yield sys.stderr
        return
    with open(path, "a") as file:
        yield file


if __name__ == "__main__":
    print(ensure_built())

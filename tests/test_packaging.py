"""A wheel of the project carries the chat page, and an installed copy (not this checkout) serves
it: `pip install .` followed by `edison serve` must not silently drop the page."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support import REPO, end_process, free_port, kill_pid, wait_until

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(REPO)],
        capture_output=True, text=True, timeout=500,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("edison-*.whl")
    return path


def test_the_wheel_contains_the_page_and_every_layer(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    page = {"edison/web/index.html", "edison/web/style.css", "edison/web/js/app.js"}
    assert page <= names, sorted(n for n in names if "web" in n)
    for layer in ("worker", "pool", "http"):
        assert f"edison/{layer}/__init__.py" in names
    web_files = {p.relative_to(REPO).as_posix() for p in (REPO / "web").rglob("*") if p.is_file()}
    assert {f"edison/{f}" for f in web_files} <= names  # every file of the page, vendored libraries too
    # The compiled abort callback (edison/worker/abort.c): without it decode steps go unarmed.
    assert any(n.startswith("edison/worker/_abort.") and n.endswith(".so") for n in names), sorted(names)


def test_an_installed_copy_serves_the_page(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(target)}
    log = open(tmp_path / "serve.log", "wb")
    # Run from an empty directory: neither this checkout's web/ nor its config.toml is reachable.
    proc = subprocess.Popen(
        [sys.executable, "-m", "edison", "serve", "--port", str(port)], cwd=tmp_path, env=env, stdout=log, stderr=log
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None

        assert wait_until(up, timeout=120), (tmp_path / "serve.log").read_text()
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        page = httpx.get(url + "/", timeout=5)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert httpx.get(url + "/js/app.js", timeout=5).status_code == 200
        served_from = httpx.get(url + "/health", params={"verbose": "1"}, timeout=5).json()
        assert served_from["status"] == "ok"
        imported = subprocess.run(
            [sys.executable, "-c", "import edison; print(edison.__file__)"], cwd=tmp_path, env=env,
            capture_output=True, text=True, timeout=60,
        ).stdout
        assert imported.startswith(str(target)), imported  # the installed copy, not the checkout
    finally:
        children = []
        try:
            import psutil

            children = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        except Exception:  # noqa: BLE001 - already gone
            pass
        end_process(proc, grace=15.0)
        for pid in children:
            kill_pid(pid)
        log.close()

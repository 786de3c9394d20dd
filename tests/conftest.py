"""Fixtures: a shared real service for tests that leave it as they found it, and a fresh
one for tests that kill, stop or wedge its processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import Service, hang_up_open_streams, write_config


@pytest.fixture(autouse=True)
def hang_up_streams() -> Iterator[None]:
    """Streams a test leaves open (it failed half-way) are hung up, which cancels them: one
    failure stays one failure instead of a slot held for the next test on the same service."""
    yield
    hang_up_open_streams()


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("service")
    svc = Service(write_config(root / "config.toml"), root / "service.log")
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def make_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Starts a private service with config overrides; always stopped (and its workers killed)."""
    started: list[Service] = []

    def make(overrides: dict[str, dict[str, Any]] | None = None, wait_ready: bool = True, **kw: Any) -> Service:
        n = len(started)
        svc = Service(write_config(tmp_path / f"config{n}.toml", overrides), tmp_path / f"service{n}.log")
        started.append(svc)
        return svc.start(wait_ready=wait_ready, **kw)

    try:
        yield make
    finally:
        for svc in started:
            svc.stop()

"""The pool's hooks at its transitions. This base ignores everything, so a pool without metrics
needs no checks; the HTTP layer's `Metrics` subclass turns them into Prometheus series."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edison.pool.models import Models
    from edison.pool.request import Event, Request


class PoolObserver:
    def watch(self, pool: Models) -> None:
        """Called once by the models it observes (every model's pool reports to the same observer)."""

    def rejected(self, reason: str) -> None:
        """The pool refused a request (queue full, shutting down, no workers): a 503."""

    def finished(self, request: Request, event: Event) -> None:
        """A request got its final event (Completed, Stopped or Failure)."""

    def resumed(self) -> None:
        """A request whose worker was lost continues on another worker."""

    def killed(self, reason: str) -> None:
        """The supervisor killed a worker: it missed a cancel deadline, or it stalled."""

    def crashed(self) -> None:
        """A worker exited without being told to (segfault, OOM kill, failed model load)."""

    def respawned(self) -> None:
        """A replacement worker was started."""

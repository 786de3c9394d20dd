"""The pool: worker handles, their supervisor, the request scheduler, cancel flags, and the
events a request yields. Imports neither starlette nor llama_cpp (tests/test_layers.py)."""

from edison.pool.observer import PoolObserver
from edison.pool.pool import Pool, Unavailable
from edison.pool.request import FINAL, Completed, Event, Failure, Queued, Request, Stopped

__all__ = ["FINAL", "Completed", "Event", "Failure", "Pool", "PoolObserver", "Queued", "Request", "Stopped", "Unavailable"]

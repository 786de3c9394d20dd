"""The models and their pools: worker handles, their supervisor, the request scheduler, cancel flags, and the
events a request yields. Imports neither starlette nor llama_cpp (tests/test_layers.py)."""

from edison.pool.observer import PoolObserver
from edison.pool.models import Models, UnknownModel
from edison.pool.pool import Pool, Unavailable
from edison.pool.request import FINAL, Completed, Event, Failure, Loading, Queued, Request, Stopped

__all__ = [
    "FINAL", "Completed", "Event", "Failure", "Loading", "Models", "Pool", "PoolObserver", "Queued", "Request", "Stopped",
    "Unavailable", "UnknownModel",
]

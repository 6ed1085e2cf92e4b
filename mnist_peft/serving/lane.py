"""The model lane: one thread that runs all of a model's work (:class:`ModelLane`).

A web server calls the engine from whichever of its worker threads takes a request (gradio's
pool holds up to 40). Each thread that allocates gets its own malloc arena, and a stack cache
whose adapters are created and freed from dozens of arenas leaves each arena's heap fragmented:
measured here, the serving process grew 741 -> 865 MB over 2,000 distinct stacks from 40
rotating threads, and stayed flat (643.5 -> 645.3 MB) when one thread did the same work. So
the engine hands every piece of model work (combine, load, forward, evict) to one thread; the
lane also serialises it, as the model's one state requires.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

__all__ = ["ModelLane"]

T = TypeVar("T")


class ModelLane:
    """Runs functions one at a time on one thread of its own (started on first use).

    :meth:`run` from the lane's own thread (a call made while the lane works, such as a retry
    inside a batch) runs at once, so nothing waits on itself.

    Example:
        >>> lane = ModelLane()
        >>> lane.run(sum, [1, 2])   # on the lane's thread; the caller waits for the result
        3
    """

    def __init__(self, name: str = "mnist-peft-model") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None

    def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """``fn(*args)`` on the lane's thread; its result, or what it raised."""
        if threading.get_ident() == self._ident:
            return fn(*args)
        return self._executor.submit(self._enter, fn, args).result()

    def _enter(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        self._ident = threading.get_ident()
        return fn(*args)

    def close(self) -> None:
        """Let the lane's thread end once the work given to it is done (a later :meth:`run` is refused)."""
        self._executor.shutdown(wait=False)

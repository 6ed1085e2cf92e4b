"""Cross-request batching (:class:`MicroBatcher`): requests that arrive together, from any number of
threads or event loops, are answered by one call of a batch function, so the engine runs one
mixed-adapter forward for all of them (what gradio's queue does for the app, for any caller).

The first request of a batch waits at most ``max_wait_s`` for company; a batch holds at most
``max_batch`` requests and ``max_rows`` rows (a request may carry several images). A request the
batch function answers with an exception gets that exception; its batch-mates get their answers.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from mnist_peft.errors import InvalidArgumentError

__all__ = ["MicroBatcher"]

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    """``submit(item)`` -> a future answered by ``fn(batch)[i]``, with ``batch`` the items that
    arrived within ``max_wait_s`` of the first (at most ``max_batch`` of them, and at most
    ``max_rows`` rows as ``rows(item)`` counts them).

    ``fn`` runs on the batcher's one thread; it returns one result per item, in order, and may put an
    exception in an item's place (that item's future raises it). If ``fn`` itself raises, every item
    of the batch gets the exception. ``on_batch(n_items, n_rows)`` is told each batch's size.

    Example:
        >>> b = MicroBatcher(lambda xs: [x * 2 for x in xs], max_batch=32, max_wait_s=0.002)
        >>> b.submit(21).result()
        42
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R | BaseException]],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        max_rows: int | None = None,
        rows: Callable[[T], int] = lambda item: 1,
        on_batch: Callable[[int, int], None] | None = None,
        name: str = "mnist-peft-batcher",
    ) -> None:
        if max_batch < 1 or not 0 <= max_wait_s <= 10 or (max_rows is not None and max_rows < 1):
            raise InvalidArgumentError(
                f"a batcher needs max_batch >= 1, max_wait_s in [0, 10] and max_rows >= 1; got {max_batch}, {max_wait_s}, {max_rows}"
            )
        self._fn, self._rows, self._on_batch = fn, rows, on_batch
        self.max_batch, self.max_wait_s, self.max_rows = max_batch, max_wait_s, max_rows
        self._queue: queue.SimpleQueue[tuple[T, Future] | None] = queue.SimpleQueue()
        self._held: tuple[T, Future] | None = None  # an item that did not fit the last batch: the next one's first
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future:
        """Queue ``item``; its future holds ``fn``'s answer for it (or raises what ``fn`` put in its place)."""
        if self._closed:
            raise InvalidArgumentError("this batcher was closed; start a new server")
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        """Answer what is queued, then stop the thread (later :meth:`submit` calls are refused)."""
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self._held or self._queue.get()
            self._held = None
            if first is None:
                return
            batch, rows = [first], self._rows(first[0])
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._run(batch, rows)
                    return
                n = self._rows(nxt[0])
                if self.max_rows is not None and rows + n > self.max_rows:
                    self._held = nxt
                    break
                batch.append(nxt)
                rows += n
            self._run(batch, rows)

    def _run(self, batch: list[tuple[T, Future]], rows: int) -> None:
        live = [(item, f) for item, f in batch if f.set_running_or_notify_cancel()]
        if not live:
            return
        if self._on_batch is not None:
            self._on_batch(len(live), rows)
        try:
            results: Sequence[Any] = self._fn([item for item, _ in live])
            if len(results) != len(live):
                raise RuntimeError(f"the batch function answered {len(results)} of {len(live)} items")
        except BaseException as exc:  # the batch function's own failure is every item's
            for _, f in live:
                f.set_exception(exc)
            return
        for (_, f), result in zip(live, results, strict=True):
            if isinstance(result, BaseException):
                f.set_exception(result)
            else:
                f.set_result(result)

    def __enter__(self) -> MicroBatcher[T, R]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

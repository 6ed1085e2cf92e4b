"""The engine as a service sees it (:class:`BatchedEngine`): one call per client request, any number
of callers at once, their requests batched into one mixed-adapter forward.

A request is checked and resolved on the caller's thread (the images through the one gate of
:mod:`~mnist_peft.serving.requests`, the spec through the engine's resolvers: a Hub pull delays its
own request only), then queued on a :class:`~mnist_peft.serving.batcher.MicroBatcher`, whose thread
hands each batch to the engine's one model thread. The HTTP service (``mnist_peft.service``), its
Ray Serve deployment and ``mnist-peft bench`` all call it; nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from .batcher import MicroBatcher
from .engine import Predictor
from .metrics import ServingMetrics
from .requests import images_to_input, require_answer
from .resolvers import HUB_PREFIX
from .stacks import Stack

__all__ = ["DEFAULT_MAX_IMAGES", "BatchedEngine", "PreparePools", "Prepared", "answer_rows", "run_prepared"]

T = TypeVar("T")

DEFAULT_MAX_IMAGES = 64  # images in one request
DEFAULT_MAX_ROWS = 1024  # images in one forward (a batch of requests)


class PreparePools:
    """Where a request is checked and resolved, off the event loop: a spec that names the Hub in a small
    pool of its own (a pull may take seconds, or a stalled repo much longer), every other in another, so
    requests for registry adapters never queue behind Hub pulls."""

    def __init__(self, *, workers: int = 16, hub_workers: int = 4) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="mnist-peft-prepare")
        self._hub = ThreadPoolExecutor(hub_workers, thread_name_prefix="mnist-peft-hub")

    async def run(self, spec: object, fn: Callable[..., T], *args: object) -> T:
        names_hub = HUB_PREFIX in spec if isinstance(spec, str) else HUB_PREFIX in repr(spec)[:20_000]
        return await asyncio.get_running_loop().run_in_executor(self._hub if names_hub else self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._hub.shutdown(wait=False)


@dataclass(frozen=True)
class Prepared:
    """One request, checked and resolved: its input rows (K, 784) and its stack (``None``: the base)."""

    x: torch.Tensor
    stack: Stack | None


def answer_rows(logits: torch.Tensor, stack: Stack | None) -> dict[str, Any]:
    """A request's answer from its rows of logits: a label and ten probabilities per image, and the
    adapters that answered (``name@version``, weight, sha256 of the weights file).

    Raises:
        NonFiniteError: a row is not finite or beyond the bound (no usable answer; see :func:`require_answer`).
    """
    require_answer(logits, who="the base" if stack is None else f"the stack {stack.label!r}")
    probabilities = logits.softmax(1)
    return {
        "predictions": [{"label": int(p.argmax()), "probabilities": p.tolist()} for p in probabilities],
        "adapters": [] if stack is None else stack.describe(),
    }


class BatchedEngine:
    """A :class:`~mnist_peft.serving.engine.Predictor` behind a :class:`MicroBatcher`: :meth:`predict`
    (blocking) and :meth:`apredict` (asyncio) answer one request; concurrent ones share a forward.

    Example:
        >>> engine = BatchedEngine(Predictor(AdapterRegistry("adapters")))
        >>> engine.predict([pixels], "digit-9@1:0.5,digit-3")
        {'predictions': [{'label': 9, 'probabilities': [...]}], 'adapters': [{'adapter': 'digit-9@1', ...}, ...]}
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        max_images: int = DEFAULT_MAX_IMAGES,
        max_rows: int = DEFAULT_MAX_ROWS,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.predictor = predictor
        self.max_images = max_images
        self._pools = PreparePools()
        self.metrics = metrics or ServingMetrics()
        self._batcher: MicroBatcher[Prepared, dict[str, Any]] = MicroBatcher(
            self.run_batch,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            max_rows=max(max_rows, max_images),
            rows=lambda p: p.x.shape[0],
            on_batch=self.metrics.batch,
        )

    def prepare(self, images: object, spec: object) -> Prepared:
        """Check ``images`` and resolve ``spec`` (on the caller's thread).

        Raises:
            InvalidArgumentError: bad images or a malformed spec (naming the field).
            EntryNotFoundError, RegistryError, HubError, IntegrityError: what the resolvers say.
        """
        x = images_to_input(images, max_images=self.max_images)
        return Prepared(x, self.predictor.resolve(spec))

    def predict(self, images: object, spec: object) -> dict[str, Any]:
        """One request's answer (see :func:`answer_rows`), batched with whatever arrives with it."""
        return self._batcher.submit(self.prepare(images, spec)).result()

    async def apredict(self, images: object, spec: object) -> dict[str, Any]:
        """:meth:`predict` for an event loop: the checks and the resolve run in a worker thread, the
        forward on the engine's, and the loop waits for neither."""
        prepared = await self._pools.run(spec, self.prepare, images, spec)
        return await asyncio.wrap_future(self._batcher.submit(prepared))

    def run_batch(self, batch: Sequence[Prepared]) -> list[dict[str, Any] | Exception]:
        """:func:`run_prepared` on this engine's predictor (what each batch of the batcher runs)."""
        return run_prepared(self.predictor, batch)

    def close(self) -> None:
        """Answer what is queued, then stop the batcher (the predictor's model stays usable)."""
        self._batcher.close()
        self._pools.close()


def run_prepared(predictor: Predictor, batch: Sequence[Prepared]) -> list[dict[str, Any] | Exception]:
    """Answers for prepared requests, all in one mixed forward; a request whose stack cannot load or
    whose answer is not finite gets its error, the others their answers (found by halving)."""
    if not batch:
        return []
    stacks = [s for p in batch for s in [p.stack] * p.x.shape[0]]
    try:
        logits = predictor.predict_batch(torch.cat([p.x for p in batch]), stacks)
    except Exception as exc:  # a stack's files are outside input too: whatever they raise fails their requests only
        if len(batch) == 1:
            return [exc]
        half = len(batch) // 2
        return [*run_prepared(predictor, batch[:half]), *run_prepared(predictor, batch[half:])]
    answers: list[dict[str, Any] | Exception] = []
    start = 0
    for p in batch:
        try:
            answers.append(answer_rows(logits[start : start + p.x.shape[0]], p.stack))
        except Exception as exc:
            answers.append(exc)
        start += p.x.shape[0]
    return answers

"""What the page is built on, and the only place gradio is imported: :func:`require_gradio` (with its
network features off), Blocks whose batched events take each request's inputs in on their own
(:func:`isolating_blocks`), handlers whose library errors reach the browser without the server's
paths (:func:`public_errors`), and the serving options checked before anything loads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from mnist_peft.errors import InvalidArgumentError, MnistPeftError
from mnist_peft.serving.cache import DEFAULT_CACHE_BYTES
from mnist_peft.serving.requests import Refused

from .context import AppContext

__all__ = ["DEFAULT_MAX_BATCH", "check_serving_options", "isolating_blocks", "public_errors", "require_gradio"]

DEFAULT_MAX_BATCH = 32


def require_gradio() -> Any:
    """Import gradio (the ``[ui]`` extra) with its network features off, or say how to install it.

    Raises:
        MnistPeftError: gradio is not installed.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check (both call out)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio as gr
    except ImportError as exc:
        raise MnistPeftError(f"the web app needs gradio ({exc}); install the ui extra: pip install -e '.[ui]'") from exc
    return gr


def check_serving_options(*, max_batch_size: int = DEFAULT_MAX_BATCH, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
    """Refuse a batch size below 1 or a negative cache budget (before a registry or a base is loaded).

    Raises:
        InvalidArgumentError: naming the bad value.
    """
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise InvalidArgumentError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
        raise InvalidArgumentError(f"cache_bytes must be an integer >= 0, got {cache_bytes!r}")


_ISOLATING: Any = None


def isolating_blocks(gr: Any) -> Any:
    """``gr.Blocks`` whose batched events take each request's inputs in on their own.

    Gradio checks a batch's inputs in one loop before the function runs (files uploaded, values
    well-formed): one hostile request (a file path it never uploaded, a malformed sketchpad value)
    fails its whole batch. Here such a request's inputs become :class:`Refused` and the batched
    handlers answer it with the error, and its batch-mates as usual. (A request that sends fewer
    values than the event has inputs still fails its batch: gradio's queue zips a batch's values
    before any of this runs.)
    """
    global _ISOLATING
    if _ISOLATING is None:

        class IsolatingBlocks(gr.Blocks):
            async def preprocess_data(self, block_fn, inputs, state, *args, **kwargs):  # type: ignore[no-untyped-def]
                try:
                    return await super().preprocess_data(block_fn, inputs, state, *args, **kwargs)
                except Exception as exc:
                    if not block_fn.batch:
                        raise
                    return [Refused(exc)] * len(block_fn.inputs)

        _ISOLATING = IsolatingBlocks
    return _ISOLATING


def public_errors(handlers: AppContext, gr: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a page handler so its library errors reach the browser as ``gr.Error`` with the
    registry's folder written ``<registry>`` (see :meth:`~mnist_peft.serving.engine.Predictor.public_message`)."""
    import functools

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)  # gradio reads the wrapped signature (its parameters, gr.SelectData)
        def wrapper(*args: Any) -> Any:
            try:
                return fn(*args)
            except MnistPeftError as exc:
                raise gr.Error(handlers.predictor.public_message(exc)) from None

        return wrapper

    return wrap

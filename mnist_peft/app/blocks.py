"""What the page is built on, and the only place gradio is imported: :func:`require_gradio` (with its
network features off), Blocks whose batched events take each request in on its own, its values
counted before it joins a batch and checked apart from its batch-mates' (:func:`isolating_blocks`),
errors that reach the browser only through the one gate,
:func:`~mnist_peft.serving.requests.public_message` (:func:`public_errors`, and the Blocks' own
``process_api``), and the serving options checked before anything loads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mnist_peft.errors import InvalidArgumentError, MnistPeftError
from mnist_peft.serving.cache import DEFAULT_CACHE_BYTES
from mnist_peft.serving.requests import Refused, public_message, without_paths

from .context import AppContext

__all__ = [
    "DEFAULT_MAX_BATCH",
    "NOT_UPLOADED",
    "arity_problem",
    "check_serving_options",
    "isolating_blocks",
    "public_errors",
    "refusal",
    "require_gradio",
]

DEFAULT_MAX_BATCH = 32
NOT_UPLOADED = (
    "a file this request names was refused: it was not uploaded by a user of this app "
    "(upload it first, as gradio_client's handle_file does, and send the reference the upload returns)"
)


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


def refusal(exc: BaseException) -> BaseException:
    """What gradio's input checks raise, as an error the gate may tell (its own text names server
    paths: the working directory, the upload folder): a file that was not uploaded, and a value
    that does not fit its component's data model, get fixed messages; anything else stays as it
    is (:func:`~mnist_peft.serving.requests.public_message` tells it as the generic message)."""
    import pydantic
    from gradio.exceptions import InvalidPathError

    if isinstance(exc, InvalidPathError):
        return InvalidArgumentError(NOT_UPLOADED)
    if isinstance(exc, pydantic.ValidationError):  # its text quotes the value sent; its title is the model's name
        return InvalidArgumentError(f"a value of this request does not have the form its component takes ({exc.title})")
    return exc


def arity_problem(fn: Any, data: object) -> str | None:
    """Why a request's ``data`` cannot join a batch of event ``fn``: not one value per input (gradio's
    queue zips a batch's values, so a short request would cut every request's inputs); ``None`` if fine."""
    if not getattr(fn, "batch", False):
        return None
    wanted = len(fn.inputs)
    if isinstance(data, list) and len(data) == wanted:
        return None
    names = ", ".join(_input_names(fn))
    got = (f"{len(data)} value" + ("" if len(data) == 1 else "s")) if isinstance(data, list) else f"a {type(data).__name__}"
    return f"this event takes {wanted} values, one per input ({names}); the request sent {got}: send one value per input, in order"


def _input_names(fn: Any) -> list[str]:
    """The event's inputs by the names its function gives them (``image``, ``adapters``), else by
    their components' labels."""
    import inspect

    with contextlib.suppress(TypeError, ValueError):
        names = list(inspect.signature(fn.fn).parameters)
        if len(names) == len(fn.inputs):
            return names
    return [str(getattr(block, "label", None) or type(block).__name__.lower()) for block in fn.inputs]


_ISOLATING: Any = None


def isolating_blocks(gr: Any) -> Any:
    """``gr.Blocks`` whose batched events take each request in on its own, and whose errors reach a
    client only through the gate (:func:`~mnist_peft.serving.requests.public_message`).

    - A request joins a batched event's queue only with one value per input (:func:`arity_problem`;
      otherwise it is refused alone, HTTP 400 with the message): gradio zips a batch's values
      before anything else runs, and one short request cut every request of its batch.
    - Gradio checks a batch's inputs (files uploaded, values well-formed) in one loop before the
      function runs: here a request whose inputs fail becomes :class:`Refused` (with
      :func:`refusal`'s error) and the batched handlers answer it with the error, its batch-mates
      as usual.
    - Whatever an event raises (a handler, gradio's own input checks, an ``EventData`` built from
      a hostile request) reaches the client as ``gr.Error`` with the gate's message, never its own
      text: set ``public_root`` to the registry's folder to have it written ``<registry>``.
    """
    global _ISOLATING
    if _ISOLATING is None:
        _ISOLATING = _isolating_class(gr)
    return _ISOLATING


def _isolating_class(gr: Any) -> Any:
    class IsolatingBlocks(gr.Blocks):
        public_root: Path | None = None

        async def preprocess_data(self, block_fn, inputs, state, *args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                return await super().preprocess_data(block_fn, inputs, state, *args, **kwargs)
            except Exception as exc:
                if not block_fn.batch:
                    raise
                return [Refused(refusal(exc))] * len(block_fn.inputs)

        async def process_api(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                return await super().process_api(*args, **kwargs)
            except gr.Error as exc:  # written for the user already (the handlers' own go through the gate)
                raise gr.Error(without_paths(str(exc.message), self.public_root)) from None
            except Exception as exc:
                raise gr.Error(public_message(refusal(exc), self.public_root)) from None

        def queue(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            result = super().queue(*args, **kwargs)
            _count_before_joining(self._queue)
            return result

    return IsolatingBlocks


def _count_before_joining(queue: Any) -> None:
    """Make ``queue`` refuse a request to a batched event that does not carry one value per input
    (:func:`arity_problem`) before it joins: it fails alone, never its batch."""
    from gradio import route_utils

    join = queue.push

    async def push(body, request, username):  # type: ignore[no-untyped-def]
        try:
            fn = route_utils.get_fn(queue.blocks, None, body)
        except Exception:  # an unknown event: gradio's own push says so
            return await join(body, request, username)
        problem = arity_problem(fn, body.data)
        if problem is not None:
            return False, problem, "error"
        return await join(body, request, username)

    queue.push = push


def public_errors(handlers: AppContext, gr: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a page handler so whatever it raises reaches the browser as ``gr.Error`` with the gate's
    message (:meth:`~mnist_peft.serving.engine.Predictor.public_message`: the toolkit's messages,
    the registry's folder written ``<registry>``; anything else the generic message)."""
    import functools

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)  # gradio reads the wrapped signature (its parameters, gr.SelectData)
        def wrapper(*args: Any) -> Any:
            try:
                return fn(*args)
            except gr.Error:
                raise
            except Exception as exc:
                raise gr.Error(handlers.predictor.public_message(exc)) from None

        return wrapper

    return wrap

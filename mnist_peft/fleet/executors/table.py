"""The name -> executor table: what ``run_fleet(executor=NAME)`` and ``--executor`` accept."""

from __future__ import annotations

from mnist_peft.errors import InvalidArgumentError

from .base import Executor
from .local import LocalExecutor
from .ray import RayExecutor

__all__ = ["EXECUTORS", "get_executor"]

EXECUTORS: dict[str, Executor] = {e.name: e for e in (LocalExecutor(), RayExecutor())}
"""Built-in executors by name; add one here (``EXECUTORS[x.name] = x``) to make it a choice."""


def get_executor(executor: str | Executor) -> Executor:
    """The executor named ``executor`` (an :class:`Executor` itself is handed back as it is).

    Raises:
        InvalidArgumentError: no executor of that name (the message lists the ones there are).
    """
    if not isinstance(executor, str):
        return executor
    if executor not in EXECUTORS:
        raise InvalidArgumentError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    return EXECUTORS[executor]

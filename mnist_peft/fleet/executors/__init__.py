"""Fleet executors behind one interface (:class:`~.base.Executor`): ``local`` (in-process, batched) and ``ray``."""

from __future__ import annotations

from .base import Executor, ExecutorResult, FleetWork
from .local import LocalExecutor
from .ray import RayExecutor
from .table import EXECUTORS, get_executor

__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorResult",
    "FleetWork",
    "LocalExecutor",
    "RayExecutor",
    "get_executor",
]

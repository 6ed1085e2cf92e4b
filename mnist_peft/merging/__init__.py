"""Combining adapters: cat, svd and the task-vector methods, looked up by name in one table.

``methods.py`` holds the table (name -> :class:`MergeMethod`) and ``register_merge_method``;
``task_vectors.py`` the task-vector merges, ``svd.py`` the low-rank factoring, ``combine.py``
``combine_adapters`` over any method in the table.
"""

from __future__ import annotations

from .combine import CombineResult, combine_adapters, resize_adapter
from .methods import DELTA_METHODS, METHODS, MergeMethod, register_merge_method

__all__ = [
    "METHODS",
    "DELTA_METHODS",
    "MergeMethod",
    "register_merge_method",
    "CombineResult",
    "combine_adapters",
    "resize_adapter",
]

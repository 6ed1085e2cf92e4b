"""Combining adapters: cat, svd and the task-vector methods, looked up by name in one table."""

from __future__ import annotations

from .combine import METHODS, CombineResult, combine_adapters, resize_adapter

__all__ = [
    "METHODS",
    "CombineResult",
    "combine_adapters",
    "resize_adapter",
]

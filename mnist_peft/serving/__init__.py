"""Serving: the mixed-adapter forward and the engine (resolve, cache, batch); no web framework inside."""

from __future__ import annotations

from .forward import hot_swap, mixed_forward

__all__ = [
    "hot_swap",
    "mixed_forward",
]

"""Serving: the mixed-adapter forward and the engine (resolve, cache, batch); no web framework inside.

``forward`` runs one batch through many adapters; ``stacks`` parses and resolves a weighted stack
spec; ``cache`` keeps checked entries and combined stacks; ``engine`` (:class:`Predictor`) answers a
batch of requests in one forward, all model work on one thread (``lane``); ``requests`` checks one
request's image, refuses an answer that is not finite, and words every error a client sees (the one gate).
"""

from __future__ import annotations

from .cache import DEFAULT_CACHE_BYTES, CacheInfo
from .engine import Predictor, ServingEngine
from .forward import hot_swap, mixed_forward
from .requests import image_to_input
from .stacks import MAX_STACK, MAX_WEIGHT, Stack, check_stack, format_stack, parse_stack, stack_items

__all__ = [
    "CacheInfo",
    "DEFAULT_CACHE_BYTES",
    "MAX_STACK",
    "MAX_WEIGHT",
    "Predictor",
    "ServingEngine",
    "Stack",
    "check_stack",
    "format_stack",
    "hot_swap",
    "image_to_input",
    "mixed_forward",
    "parse_stack",
    "stack_items",
]

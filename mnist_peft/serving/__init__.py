"""Serving: the mixed-adapter forward and the engine (resolve, cache, batch); no web framework inside.

``forward`` runs one batch through many adapters; ``stacks`` parses and resolves a weighted stack
spec; ``cache`` keeps checked entries and combined stacks; ``engine`` (:class:`Predictor`) answers a
batch of requests in one forward, all model work on one thread (``lane``); ``requests`` checks one
request's image, refuses an answer that is not finite, and words every error a client sees (the one gate);
``resolvers`` find the adapters a spec names (the registry, named stacks, the Hub), tried in order;
``batcher`` and ``batched`` (:class:`BatchedEngine`) batch concurrent callers' requests into one forward
for a service; ``metrics`` counts what a server did, in Prometheus' text format.

The names below resolve on first use (PEP 562): ``stacks`` and ``resolvers`` are torch-free, and
``registry add-stack`` parses a spec without importing the engine.
"""

from __future__ import annotations

from mnist_peft.lazy import lazy_names

_HOMES = {
    "BatchedEngine": "batched",
    "MicroBatcher": "batcher",
    "DEFAULT_CACHE_BYTES": "cache",
    "CacheInfo": "cache",
    "Predictor": "engine",
    "ServingEngine": "engine",
    "hot_swap": "forward",
    "mixed_forward": "forward",
    "ServingMetrics": "metrics",
    "image_to_input": "requests",
    "HubResolver": "resolvers",
    "Member": "resolvers",
    "RegistryResolver": "resolvers",
    "Resolver": "resolvers",
    "MAX_STACK": "stacks",
    "MAX_WEIGHT": "stacks",
    "Stack": "stacks",
    "check_stack": "stacks",
    "format_stack": "stacks",
    "parse_stack": "stacks",
    "stack_items": "stacks",
}
__all__ = list(_HOMES)
__getattr__, __dir__ = lazy_names(__name__, _HOMES, globals())

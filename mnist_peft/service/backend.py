"""What the HTTP API answers from (:class:`ServiceBackend`), and the in-process one (:class:`LocalBackend`:
a :class:`~mnist_peft.serving.batched.BatchedEngine` in this process). The Ray Serve deployment
(``ray_serve``) is the second: the same API, its forwards on replicas that hold the stacks.
"""

from __future__ import annotations

from typing import Any, Protocol

from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.entry import RegistryEntry
from mnist_peft.serving.batched import BatchedEngine
from mnist_peft.serving.cache import CacheInfo
from mnist_peft.serving.requests import public_message

__all__ = ["LocalBackend", "ServiceBackend", "entry_view"]


class ServiceBackend(Protocol):
    """The API's one dependency: answers, the registry's listing, the engine's numbers, the error gate."""

    async def predict(self, images: object, spec: object) -> dict[str, Any]:
        """One request's answer (``{"predictions": [...], "adapters": [...]}``, see
        :func:`~mnist_peft.serving.batched.answer_rows`); raises the toolkit's typed errors on bad input."""
        ...

    def entries(self, name: str | None = None) -> list[RegistryEntry]:
        """The registry's entries (every version of ``name`` only, when given; EntryNotFoundError if none)."""
        ...

    def cache_info(self) -> CacheInfo | None:
        """The stack cache's numbers, where this process holds the cache (None where replicas do)."""
        ...

    def public_message(self, exc: BaseException) -> str:
        """``exc`` as one line a client may see (:func:`~mnist_peft.serving.requests.public_message`)."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """The API over a :class:`BatchedEngine` in this process (``mnist-peft serve`` without ``--ray``)."""

    def __init__(self, engine: BatchedEngine) -> None:
        self.engine = engine
        self.registry: AdapterRegistry = engine.predictor.registry

    async def predict(self, images: object, spec: object) -> dict[str, Any]:
        return await self.engine.apredict(images, spec)

    def entries(self, name: str | None = None) -> list[RegistryEntry]:
        return list_entries(self.registry, name)

    def cache_info(self) -> CacheInfo | None:
        return self.engine.predictor.cache_info()

    def public_message(self, exc: BaseException) -> str:
        return public_message(exc, self.registry.root)

    def close(self) -> None:
        self.engine.close()


def list_entries(registry: AdapterRegistry, name: str | None = None) -> list[RegistryEntry]:
    """Every entry, every version of ``name`` (oldest first), or the one ``name@version``.

    Raises:
        InvalidNameError: ``name`` is not a registry reference.  EntryNotFoundError: no such entry.
    """
    if name is None:
        return registry.list()
    latest = registry.get(name)  # validates the reference; EntryNotFoundError names what exists
    if "@" in name:
        return [latest]
    return [e for e in registry.list() if e.name == latest.name]


def entry_view(entry: RegistryEntry) -> dict[str, Any]:
    """An entry as a client sees it: what it is and the sha256 of its files, never a server path."""
    return {
        "name": entry.name,
        "version": entry.version,
        "ref": entry.ref,
        "kind": entry.kind,
        "adapter_type": entry.adapter_type,
        "digit": entry.digit,
        "r": entry.r,
        "lora_alpha": entry.lora_alpha,
        "base_fingerprint": entry.base_fingerprint,
        "created": entry.created,
        "files": {fname: {"sha256": meta.get("sha256"), "size": meta.get("size")} for fname, meta in sorted(entry.files.items())},
        "metrics": entry.metrics,
        "source": entry.source,
    }

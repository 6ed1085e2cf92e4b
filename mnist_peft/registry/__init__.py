"""The adapter registry: names and references, entries, reads and verify, writes, and the index stores."""

from __future__ import annotations

from .adapter_registry import AdapterRegistry, RegistryEntry, parse_ref

__all__ = [
    "AdapterRegistry",
    "RegistryEntry",
    "parse_ref",
]

"""Where a registry keeps its index, behind one small interface (:class:`IndexStore`, in ``base``).

- ``sqlite``: :class:`SqliteIndex`, ``index.db``, the registry's index (SQLite in WAL mode).
- ``json``: :class:`JsonIndex`, ``index.json``, the exchange format (export, Hub repos, registries
  made before ``index.db``).
- ``folder``: :class:`FolderIndex`, a registry folder's own index (``index.db``, or a legacy
  ``index.json`` until the first write): what ``AdapterRegistry(root)`` uses unless given a store.

A new store (say, a server's database) implements :class:`IndexStore` and is passed as
``AdapterRegistry(root, store=...)``; the registry does not change.
"""

from __future__ import annotations

from .base import INDEX_FORMAT, IndexMovedError, IndexStore
from .folder import FolderIndex
from .json import JsonIndex
from .sqlite import SqliteIndex

__all__ = ["INDEX_FORMAT", "FolderIndex", "IndexMovedError", "IndexStore", "JsonIndex", "SqliteIndex"]

"""What the registry needs from an index: the :class:`IndexStore` protocol, its document format and errors.

A store holds *raw* entries: the JSON objects of the ``index.json`` format, keyed by name and
version, plus each name's high-water mark (the highest version it ever had). It never interprets
an entry: the registry validates every entry it reads (a store's content is outside input like any
other), and owns every folder on disk. :class:`~mnist_peft.registry.adapter_registry.AdapterRegistry`
takes any object with these methods (``AdapterRegistry(root, store=...)``); a new store (say, a
server's database) implements them and the registry does not change.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from mnist_peft.errors import RegistryError

__all__ = ["INDEX_FORMAT", "IndexMovedError", "IndexStore", "document_parts", "empty_document", "int_or_zero", "sort_key", "unreadable"]

INDEX_FORMAT = 1  # the index.json document: {"format", "entries": [...], "high_water": {name: version}}


class IndexStore(Protocol):
    """What the registry needs from an index. ``name=None`` means every name.

    Reads may raise :class:`IndexMovedError` when the index moved away under the reader (the
    registry then reads once more); any other problem is a :class:`RegistryError`. Writes are
    made under the registry's lock, so a store need not serialise writers itself, but each
    ``write``/``load``/``create`` must be atomic (a crash leaves the old index or the new one).
    """

    path: Path  # where the index lives: named in error messages and by ``AdapterRegistry.index_path``

    def exists(self) -> bool:
        """Whether there is an index to read (an empty registry has none)."""
        ...

    def writable(self) -> bool:
        """Whether writes can go to the index as it stands; ``False`` when :meth:`create` must make it
        first (there is none yet, or it is in an older form that ``create`` replaces)."""
        ...

    def create(self, document: dict[str, object] | None = None) -> None:
        """Make the index with ``document``'s entries and marks (default: empty), atomically: never
        seen half-made. Called under the lock when :meth:`writable` is ``False``; ``document`` then
        holds the validated content of the index as it was read (an older form's, carried over)."""
        ...

    def entries(self, name: str | None = None) -> list[object]:
        """The raw entries (of one name), in no particular order."""
        ...

    def marks(self, name: str | None = None) -> dict[str, object]:
        """Raw high-water marks (of one name)."""
        ...

    def write(self, *, add: Sequence[dict[str, object]] = (), remove: Sequence[tuple[str, int]] = (), marks: dict[str, int]) -> None:
        """One atomic change: drop ``remove``'s (name, version) rows, store ``add``, raise marks (never lower them)."""
        ...

    def dump(self) -> dict[str, object]:
        """Everything, as an ``index.json`` document."""
        ...

    def load(self, document: dict[str, object]) -> None:
        """Replace everything with an ``index.json`` document's entries and marks (atomically)."""
        ...


class IndexMovedError(RegistryError):
    """An ``index.json`` vanished between choosing it and reading it (moved to ``index.db`` by a
    writer meanwhile): the reader chooses again."""


def empty_document() -> dict[str, object]:
    """An ``index.json`` document with no entries and no marks."""
    return {"format": INDEX_FORMAT, "entries": [], "high_water": {}}


def unreadable(path: Path, exc: BaseException) -> RegistryError:
    return RegistryError(f"registry index {str(path)!r} is unreadable ({type(exc).__name__}: {exc}); restore it from a backup")


def sort_key(entry: object) -> tuple[str, int]:
    """Entries in a document are sorted by name, then version."""
    return (str(entry.get("name")), int_or_zero(entry.get("version"))) if isinstance(entry, dict) else ("", 0)


def int_or_zero(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63 else 0


def document_parts(path: Path, document: object) -> tuple[list[object], dict[str, object]]:
    """A document's ``entries`` list and ``high_water`` map, checked for their types only.

    Raises:
        RegistryError: either is missing or of the wrong type.
    """
    if not isinstance(document, dict) or not isinstance(document.get("entries"), list):
        raise RegistryError(f"registry index {str(path)!r} has no 'entries' list; restore it from a backup")
    marks = document.get("high_water") or {}
    if not isinstance(marks, dict):
        raise RegistryError(f"registry index {str(path)!r} has an invalid 'high_water' map; restore it from a backup")
    return document["entries"], marks

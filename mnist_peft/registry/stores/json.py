"""``index.json``: the index as one JSON document (:class:`JsonIndex`), the exchange format.

Written by ``mnist-peft registry export`` and into Hub repos by ``push``, for the Hub and for
people. A registry made before ``index.db`` existed is read from its ``index.json`` and moves to
``index.db`` on its first write (see :class:`~mnist_peft.registry.stores.folder.FolderIndex`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mnist_peft.errors import RegistryError
from mnist_peft.fileio import atomic_write_json, read_regular_file

from .base import INDEX_FORMAT, IndexMovedError, document_parts, empty_document, sort_key, unreadable

__all__ = ["JsonIndex"]


class JsonIndex:
    """``index.json``: the whole index in one JSON document, rewritten on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.is_file() or self.path.is_symlink()

    def writable(self) -> bool:
        return self.exists()

    def create(self, document: dict[str, object] | None = None) -> None:
        self.load(document or empty_document())

    def exported(self) -> bool:
        """Whether this file is an export of an ``index.db`` (never an index in its own right)."""
        return self._document().get("exported") is True

    def _document(self) -> dict[str, object]:
        if self.path.is_symlink():
            raise RegistryError(f"{str(self.path)!r} is a symlink; the registry does not follow links: replace it with the real file")
        try:
            document = json.loads(read_regular_file(str(self.path)))
        except FileNotFoundError:
            raise IndexMovedError(f"registry index {str(self.path)!r} is gone (moved to index.db meanwhile?)") from None
        except (OSError, ValueError, RecursionError, UnicodeDecodeError) as exc:  # bad JSON, huge numbers, deep nesting
            raise unreadable(self.path, exc) from exc
        document_parts(self.path, document)
        return document

    def entries(self, name: str | None = None) -> list[object]:
        entries, _ = document_parts(self.path, self._document())
        return [e for e in entries if name is None or (isinstance(e, dict) and e.get("name") == name)]

    def marks(self, name: str | None = None) -> dict[str, object]:
        _, marks = document_parts(self.path, self._document())
        return {k: v for k, v in marks.items() if name is None or k == name}

    def write(self, *, add: Sequence[dict[str, object]] = (), remove: Sequence[tuple[str, int]] = (), marks: dict[str, int]) -> None:
        document = self._document()
        gone = set(remove)
        entries = [e for e in document["entries"] if not (isinstance(e, dict) and (e.get("name"), e.get("version")) in gone)]
        high = dict(document.get("high_water") or {})
        for k, v in marks.items():
            high[k] = max(v, high.get(k, 0)) if isinstance(high.get(k, 0), int) else v
        self.load({"format": INDEX_FORMAT, "entries": [*entries, *add], "high_water": high})

    def dump(self) -> dict[str, object]:
        return self._document()

    def load(self, document: dict[str, object]) -> None:
        entries, marks = document_parts(self.path, document)
        entries = sorted(entries, key=sort_key)
        flag = {"exported": True} if document.get("exported") is True else {}
        atomic_write_json(self.path, {"format": INDEX_FORMAT, **flag, "entries": entries, "high_water": dict(sorted(marks.items()))})

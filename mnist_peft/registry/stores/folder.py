"""A registry folder's own index (:class:`FolderIndex`): the store ``AdapterRegistry(root)`` uses by default.

``<root>/index.db`` (:class:`~mnist_peft.registry.stores.sqlite.SqliteIndex`); for a registry made
before ``index.db`` existed, its ``<root>/index.json``
(:class:`~mnist_peft.registry.stores.json.JsonIndex`) is read as it is until the first write,
which moves it to ``index.db`` (the JSON file is kept, renamed ``index.json.imported``). An
``index.json`` that is only an export of an ``index.db`` is never taken for the index, and no index
at all beside entry folders is an error (the index was lost), never a new, empty registry.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mnist_peft.errors import RegistryError
from mnist_peft.fileio import fsync_dir

from ..names import DB_NAME, IMPORTED_NAME, INDEX_NAME, confine, entry_folders
from .json import JsonIndex
from .sqlite import SqliteIndex

__all__ = ["FolderIndex"]


class FolderIndex:
    """``index.db`` in ``root``; ``index.json`` for a registry made before it (until its first write).

    Which of the two is the index is chosen again on every call: another process may move the
    registry to ``index.db`` at any time (readers then get :class:`IndexMovedError` and read again).
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _current(self) -> SqliteIndex | JsonIndex:
        db = SqliteIndex(confine(self.root, DB_NAME))  # never opened through a link
        if os.path.lexists(db.path) and not db.exists():
            raise RegistryError(f"{str(db.path)!r} is not a regular file; the registry index must be one: restore it from a backup")
        if not db.exists():
            legacy = JsonIndex(confine(self.root, INDEX_NAME))
            if legacy.exists():
                if legacy.exported():
                    raise RegistryError(
                        f"{str(db.path)!r} is missing and {str(legacy.path)!r} is only an export of it (it may be stale): "
                        "restore index.db from a backup"
                    )
                return legacy
        return db

    def signature(self) -> tuple[object, ...] | None:
        """What changes whenever the index is written (device, inode, size and times of ``index.db``
        and ``index.json``), or ``None`` while a writer is at work (``index.db-wal`` exists): a reader
        that keeps what it resolved may keep it while the signature stays the same."""
        if os.path.lexists(self.root / f"{DB_NAME}-wal"):
            return None
        found: list[object] = []
        for name in (DB_NAME, INDEX_NAME):
            try:
                st = os.stat(self.root / name, follow_symlinks=False)
            except FileNotFoundError:
                found.append(None)
                continue
            found.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(found)

    @property
    def path(self) -> Path:
        """The file the index lives in now: ``index.db``, or ``index.json`` before the first write."""
        return self._current().path

    def exists(self) -> bool:
        """Whether there is an index; no index beside entry folders is an error, never an empty registry.

        Raises:
            RegistryError: the index is missing but ``root`` holds ``<name>/v<N>`` folders (a
                registry's first write makes the index before any folder, so its index was lost).
        """
        current = self._current()
        if current.exists():
            return True
        held = entry_folders(self.root, limit=4)
        if held:
            raise RegistryError(
                f"registry index {str(current.path)!r} is missing, but {str(self.root)!r} holds entry folders "
                f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}): restore index.db from a backup (the folders are left as they are)"
            )
        return False

    def writable(self) -> bool:
        """Only ``index.db`` is written to: an ``index.json`` registry is moved by :meth:`create` first."""
        current = self._current()
        return isinstance(current, SqliteIndex) and current.exists()

    def create(self, document: dict[str, object] | None = None) -> None:
        """Make ``index.db`` with ``document``'s content (made aside and renamed in: readers see the
        old index or the new one); an ``index.json`` it replaces is kept, renamed."""
        current = self._current()
        SqliteIndex(confine(self.root, DB_NAME)).create(document)
        if isinstance(current, JsonIndex):
            os.replace(current.path, confine(self.root, IMPORTED_NAME))
        fsync_dir(self.root)

    def entries(self, name: str | None = None) -> list[object]:
        return self._current().entries(name)

    def marks(self, name: str | None = None) -> dict[str, object]:
        return self._current().marks(name)

    def write(self, *, add: Sequence[dict[str, object]] = (), remove: Sequence[tuple[str, int]] = (), marks: dict[str, int]) -> None:
        self._current().write(add=add, remove=remove, marks=marks)

    def dump(self) -> dict[str, object]:
        return self._current().dump()

    def load(self, document: dict[str, object]) -> None:
        self._current().load(document)

"""A local adapter registry: versioned entries with fingerprints and integrity checks.

Layout (``adapters/`` by default; ``--root`` or ``$MNIST_PEFT_ADAPTERS``)::

    index.db              the index (SQLite, see :mod:`mnist_peft.registry.stores.sqlite`): every entry's name,
                          version, kind, digit, r, lora_alpha, base_fingerprint, files {name:
                          {sha256, size}}, created, metrics, source, path; and high-water marks
    base/v1/              a base model folder (config.json, model.safetensors, README.md)
    digit-9/v1/           an adapter folder in PEFT layout
    digit-9/v2/           a newer version; v1 is kept
    mix/v1/               a named stack: stack.json (pinned name@version members and weights), README.md
    .staging/             folders being written (renamed into place when complete)

``index.json`` is the same index as one JSON document, the exchange format: written by
``mnist-peft registry export`` (and into Hub repos by ``push``); a registry made before
``index.db`` is read from it and moves to ``index.db`` on its first write.

Writes are atomic (files are staged in a temporary folder inside the root and renamed into place;
the index changes in one transaction) and serialised with a file lock, so concurrent writers lose
nothing and a writer killed mid-way leaves the previous index intact. Looking up a name and adding
a version cost the same at 10,000 entries as at 10.

Everything read from the index is outside input and validated before use (names, versions,
file names, types); an entry's folder is always ``<name>/v<version>``, derived, and every path the
registry touches goes through :func:`confine`: no ``..``, no absolute paths, no symlinks below the
root. The registry deletes only what it created: entry folders it lists, and its own
leftovers in ``.staging/``. Version numbers are never reused (a per-name high-water mark survives
``rm``, and every ``<name>/v<N>`` on disk counts as used). An index that is missing, empty or not
exactly what the registry writes (tables dropped, views, triggers) beside entry folders is an
error that says to restore it, never an empty registry.

The class is assembled from its concerns: names and :func:`confine` (``names``), entries
(``entry``), reads and verify (``reads``), writes (``writes``); the index is a store behind the
:class:`~mnist_peft.registry.stores.base.IndexStore` protocol, ``index.db`` in the root by default
(:class:`~mnist_peft.registry.stores.folder.FolderIndex`), any other one passed as ``store``.
"""

from __future__ import annotations

import os
from pathlib import Path

from mnist_peft.errors import RegistryError

from .entry import RegistryEntry
from .names import INDEX_NAME, confine, default_root
from .stacks import add_stack
from .stores.base import INDEX_FORMAT, IndexStore
from .stores.folder import FolderIndex
from .stores.json import JsonIndex
from .writes import RegistryWrites

__all__ = ["AdapterRegistry"]


class AdapterRegistry(RegistryWrites):
    """Versioned adapters and bases in a folder, with an index (``index.db``).

    Lookups and verify come from :class:`~mnist_peft.registry.reads.RegistryReads`, ``add`` and
    ``remove`` from :class:`~mnist_peft.registry.writes.RegistryWrites`.

    Args:
        root: the registry's folder (default: :func:`~mnist_peft.registry.names.default_root`).
        store: where the index is kept: any :class:`~mnist_peft.registry.stores.base.IndexStore`
            (default: ``index.db`` in ``root``, read from a legacy ``index.json`` until the first write).

    Example:
        >>> reg = AdapterRegistry("adapters")
        >>> entry = reg.add("digit-9", "out/digit-9", metrics={"accuracy": 0.987})
        >>> reg.path("digit-9")        # verified folder of the latest version
        PosixPath('adapters/digit-9/v1')
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, store: IndexStore | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.store: IndexStore = store if store is not None else FolderIndex(self.root)

    @property
    def index_path(self) -> Path:
        """Where the index lives: ``index.db`` (or ``index.json`` for a registry made before it)."""
        return self.store.path

    def index_signature(self) -> tuple[object, ...] | None:
        """What changes whenever the index is written, or ``None`` when that cannot be told (a writer at
        work, a store that keeps no such record): what a server that keeps resolved references checks
        before it reuses one (see :meth:`~mnist_peft.registry.stores.folder.FolderIndex.signature`)."""
        signature = getattr(self.store, "signature", None)
        return signature() if callable(signature) else None

    def add_stack(self, name: str, items: list[tuple[str, float]]) -> RegistryEntry:
        """Record a weighted stack of adapter entries as the next version of stack entry ``name``
        (kind ``stack``): see :func:`~mnist_peft.registry.stacks.add_stack`.

        Example:
            >>> reg.add_stack("mix", [("digit-9@1", 0.5), ("digit-3", 1.0)]).ref
            'mix@1'
        """
        return add_stack(self, name, items)

    def export_index(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the index as one ``index.json`` document (the exchange format) to ``path``
        (default: ``<root>/index.json``); every entry is validated first."""
        entries, marks = self._read()
        target = confine(self.root, INDEX_NAME) if path is None else Path(path)
        if (
            path is not None
            and target.resolve().is_relative_to(self.root.resolve())
            and target.resolve() != (self.root / INDEX_NAME).resolve()
        ):
            raise RegistryError(
                f"refusing to export to {str(target)!r}: inside the registry only {INDEX_NAME} may be written (the rest is the registry's own)"
            )
        JsonIndex(target).load({"format": INDEX_FORMAT, "exported": True, "entries": [e.to_dict() for e in entries], "high_water": marks})
        return target

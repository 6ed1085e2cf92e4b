"""The registry's reads: lookups (``list``, ``get``, ``path``) and integrity checks (``verify``,
``read_file``), every entry validated as it comes out of the store (an index is outside input)."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
from collections.abc import Callable
from pathlib import Path

from mnist_peft.errors import EntryNotFoundError, IntegrityError, InvalidNameError, RegistryError
from mnist_peft.fileio import read_regular_file, sha256_file

from .entry import RegistryEntry, entry_from_dict
from .names import MAX_VERSION, confine, parse_ref, validate_file_name
from .stacks import verify_stack
from .stores.base import IndexMovedError, IndexStore

__all__ = ["RegistryReads"]


class RegistryReads:
    """Lookups and verification over ``self.store``, for the entries in folders below ``self.root``
    (part of :class:`~mnist_peft.registry.adapter_registry.AdapterRegistry`)."""

    root: Path
    store: IndexStore

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise RegistryError(
                f"no registry at {str(self.root)!r} (the folder does not exist): check --root or $MNIST_PEFT_ADAPTERS, "
                "or create one with `mnist-peft registry add NAME FOLDER --root DIR`"
            )

    def _read(self, name: str | None = None) -> tuple[list[RegistryEntry], dict[str, int]]:
        """The entries and high-water marks (of one name), validated (the index is outside input)."""
        self._require_root()
        try:
            return self._read_from(self.store, name)
        except IndexMovedError:  # a writer moved index.json to index.db just now: read that
            return self._read_from(self.store, name)

    def _read_from(self, store: IndexStore, name: str | None) -> tuple[list[RegistryEntry], dict[str, int]]:
        if not store.exists():
            return [], {}
        where = f"registry index {str(store.path)!r}"
        entries = [
            entry_from_dict(e, where=where, path=f"{e.get('name')}/v{e.get('version')}" if isinstance(e, dict) else None)
            for e in store.entries(name)
        ]
        refs = [e.ref for e in entries]
        if len(set(refs)) != len(refs):
            raise RegistryError(f"{where} lists a version twice; restore it from a backup")
        marks = store.marks(name)
        if not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_VERSION for k, v in marks.items()
        ):
            raise RegistryError(f"{where} has an invalid 'high_water' map; restore it from a backup")
        marks = dict(marks)
        for e in entries:  # an index written before the marks existed: every version read is used
            marks[e.name] = max(marks.get(e.name, 0), e.version)
        return entries, marks  # type: ignore[return-value]

    def _read_index(self) -> list[RegistryEntry]:
        return self._read()[0]

    def folder(self, entry: RegistryEntry) -> Path:
        """An entry's folder, ``<root>/<name>/v<version>``, confined (no symlink on the way)."""
        return confine(self.root, f"{entry.name}/v{entry.version}")

    # -- queries
    def list(self) -> list[RegistryEntry]:
        return sorted(self._read_index(), key=lambda e: (e.name, e.version))

    def get(self, ref: str) -> RegistryEntry:
        """The entry for ``name`` (latest version) or ``name@version``."""
        name, version = parse_ref(ref)
        versions = self._read(name)[0]
        if not versions:
            raise EntryNotFoundError(f"no registry entry {name!r} in {str(self.root)!r}; {self.names_hint(name)}", name=name)
        if version is None:
            return max(versions, key=lambda e: e.version)
        for e in versions:
            if e.version == version:
                return e
        raise EntryNotFoundError(f"{name!r} has no version {version}; versions: {sorted(e.version for e in versions)}", name=ref)

    def names_hint(self, name: str, *, shown: int = 5) -> str:
        """What to say when ``name`` is not an entry: a few of the names there are, and the closest
        ones (``did you mean 'digit-9'?``). One line whatever the registry's size.

        Example:
            >>> reg.names_hint("digit9")
            "entries: digit-7, digit-9 (did you mean 'digit-9'?); see `mnist-peft registry list`"
        """
        known = sorted({e.name for e in self._read_index()})
        if not known:
            return "the registry has no entries yet (add one with `mnist-peft registry add NAME FOLDER`)"
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        listed = ", ".join(known[:shown]) + (f" and {len(known) - shown:,} more" if len(known) > shown else "")
        guess = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        return f"entries: {listed}{guess}; see `mnist-peft registry list`"

    def __contains__(self, ref: str) -> bool:
        try:
            self.get(ref)
        except (EntryNotFoundError, InvalidNameError):
            return False
        return True

    def path(self, ref: str, *, verify: bool = True) -> Path:
        """The folder of an entry, after checking every file's size and sha256."""
        entry = self.get(ref)
        if verify:
            self.verify_entry(entry)
        return self.folder(entry)

    # -- integrity
    def verify_entry(self, entry: RegistryEntry) -> None:
        """Raise :class:`IntegrityError` naming the first missing, resized, altered or linked file, or,
        for an adapter, a layer whose update on the fixed probe batch is not finite or too large
        (``io.probe``: an entry added before that check, or by another tool), or, for a stack, a
        refused ``stack.json`` or a member that is missing, changed or does not verify itself
        (:func:`~mnist_peft.registry.stacks.verify_stack`). Torch-free."""
        try:
            folder = self.folder(entry)
        except RegistryError as exc:
            raise IntegrityError(f"{entry.ref}: {exc}", path=self.root / entry.name) from exc
        paths = {fname: self._file_path(entry, fname) for fname in entry.files}
        if not folder.is_dir():
            raise IntegrityError(f"{entry.ref}: folder {str(folder)!r} is missing; re-add or pull the entry again", path=folder)
        probed = ("adapter_config.json", "adapter_model.safetensors")
        probe = entry.kind == "lora" and all(f in entry.files for f in probed)
        for fname, info in entry.files.items():
            p = paths[fname]
            if not p.is_file():
                raise _missing(entry, p)
            if not (probe and fname in probed):  # those two are read (and checked) once, below
                _check_recorded(entry, p, info, p.stat().st_size, lambda p=p: sha256_file(p))
        if probe:
            from mnist_peft.errors import ModelLoadError, NonFiniteError
            from mnist_peft.io.probe import probe_adapter_bytes

            config, weights = (self.read_file(entry, fname) for fname in probed)
            try:
                probe_adapter_bytes(config, weights, what=f"adapter {entry.ref}", path=str(paths[probed[1]]))
            except (NonFiniteError, ModelLoadError) as exc:
                raise IntegrityError(f"{entry.ref}: {exc}", path=paths[probed[1]]) from None
        if entry.kind == "stack":
            verify_stack(self, entry)

    def read_file(self, entry: RegistryEntry, fname: str) -> bytes:
        """The bytes of one of ``entry``'s files, checked against the size and sha256 the index
        records for it. The file is read once: the bytes returned are the bytes checked (a file
        replaced between a separate :meth:`verify_entry` and a read could not slip in).

        Example:
            >>> raw = reg.read_file(reg.get("digit-9@1"), "adapter_model.safetensors")

        Raises:
            IntegrityError: ``fname`` is not one of the entry's files, or it is missing, resized or altered.
        """
        info = entry.files.get(fname)
        if info is None:
            raise IntegrityError(
                f"{entry.ref}: the index lists no file {fname!r} for it (files: {sorted(entry.files)}); re-add the entry",
                path=self.root / entry.name,
            )
        p = self._file_path(entry, fname)
        with contextlib.suppress(OSError):  # a file of another size is said before it is read (it may be huge)
            _check_recorded(entry, p, info, p.stat().st_size, lambda: str(info["sha256"]))
        try:
            data = read_regular_file(str(p))
        except FileNotFoundError:
            raise _missing(entry, p) from None
        except OSError as exc:
            raise IntegrityError(
                f"{entry.ref}: file {str(p)!r} cannot be read ({exc.strerror or exc}); it must be a regular file", path=p
            ) from None
        _check_recorded(entry, p, info, len(data), lambda: hashlib.sha256(data).hexdigest())
        return data

    def _file_path(self, entry: RegistryEntry, fname: str) -> Path:
        """Where ``entry``'s file ``fname`` lives, confined to the registry (an index is outside input)."""
        try:
            return confine(self.root, f"{entry.name}/v{entry.version}/{validate_file_name(fname)}")
        except RegistryError as exc:
            raise IntegrityError(f"{entry.ref}: {exc}", path=self.root / entry.name) from exc

    def verify(self) -> list[tuple[str, str]]:
        """Check every entry; returns ``(ref, problem)`` for each bad one (empty when all are good).

        Raises:
            RegistryError: the root does not exist, or the index itself is invalid.
        """
        problems = []
        for entry in self.list():
            try:
                self.verify_entry(entry)
            except IntegrityError as exc:
                problems.append((entry.ref, str(exc)))
        return problems


def _missing(entry: RegistryEntry, p: Path) -> IntegrityError:
    return IntegrityError(f"{entry.ref}: file {str(p)!r} is missing; re-add or pull the entry again", path=p)


def _check_recorded(entry: RegistryEntry, p: Path, info: dict[str, object], size: int, digest: Callable[[], str]) -> None:
    """Raise :class:`IntegrityError` unless a file of ``size`` bytes (and, only then, ``digest()``) is
    what the index records for it in ``info``."""
    if size != info["size"]:
        raise IntegrityError(f"{entry.ref}: file {str(p)!r} has {size} bytes, the index says {info['size']} (truncated?)", path=p)
    if digest() != info["sha256"]:
        raise IntegrityError(f"{entry.ref}: file {str(p)!r} does not match its recorded sha256 (corrupted or edited)", path=p)

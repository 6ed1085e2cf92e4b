"""A local adapter registry: versioned entries with fingerprints and integrity checks.

Layout (``adapters/`` by default; ``--root`` or ``$MNIST_PEFT_ADAPTERS``)::

    index.db              the index (SQLite, see :mod:`mnist_peft.registry.stores`): every entry's name,
                          version, kind, digit, r, lora_alpha, base_fingerprint, files {name:
                          {sha256, size}}, created, metrics, source, path; and high-water marks
    base/v1/              a base model folder (config.json, model.safetensors, README.md)
    digit-9/v1/           an adapter folder in PEFT layout
    digit-9/v2/           a newer version; v1 is kept
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
``rm``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from filelock import FileLock

from mnist_peft.errors import EntryNotFoundError, IntegrityError, InvalidNameError, RegistryError
from mnist_peft.fileio import current_umask, fsync_dir, read_regular_file, sha256_file

from .stores import INDEX_FORMAT, IndexMovedError, IndexStore, JsonIndex, SqliteIndex

__all__ = ["AdapterRegistry", "RegistryEntry", "parse_ref", "default_root", "confine", "validate_file_name", "NAME_PATTERN"]

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
INDEX_NAME = "index.json"  # the exchange format (export, Hub repos, registries made before index.db)
DB_NAME = "index.db"
IMPORTED_NAME = "index.json.imported"  # an old index.json, kept after its move to index.db
LOCK_NAME = ".index.lock"
STAGING_DIR = ".staging"
STAGING_PREFIX = "add-"
STAGING_MARKER = ".mnist-peft-staging"  # inside every staging folder this registry makes
MAX_VERSION = 10**9  # a version number beyond this is not one the registry wrote
RESERVED_NAMES = frozenset({INDEX_NAME, DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal", IMPORTED_NAME})
ENV_ROOT = "MNIST_PEFT_ADAPTERS"
KINDS = ("base", "lora")


def default_root() -> Path:
    """``$MNIST_PEFT_ADAPTERS``, else ``./adapters``."""
    return Path(os.environ.get(ENV_ROOT) or "adapters")


def validate_name(name: str) -> str:
    """A registry name: ``[a-z0-9][a-z0-9._-]*``, no path separators, not ``.``/``..``-like."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name or len(name) > 100:
        raise InvalidNameError(
            f"invalid registry name {name!r}: use lowercase letters, digits, '.', '_' and '-', starting with a "
            "letter or digit (e.g. 'digit-9'), at most 100 characters",
            name=str(name),
        )
    if name in RESERVED_NAMES:
        raise InvalidNameError(f"{name!r} is reserved for the registry's own files; pick another name", name=name)
    return name


def validate_file_name(fname: object) -> str:
    """A plain file name (no folder, no ``..``, not hidden): what an entry's files may be called."""
    if not isinstance(fname, str) or not FILE_NAME_PATTERN.fullmatch(fname) or ".." in fname or len(fname) > 200:
        raise RegistryError(f"invalid file name {fname!r} in a registry entry: only plain names such as 'adapter_config.json' are allowed")
    return fname


def confine(root: Path, rel: str) -> Path:
    """``root / rel``, refused unless it stays inside ``root`` with no symlink on the way.

    The one gate for every path the registry and the Hub sync touch below a root: ``rel`` must be
    relative, made of plain names (no ``..``, ``.`` or empty parts, no backslash or NUL), and no
    existing component below ``root`` may be a symlink (the root itself may be one).

    Raises:
        RegistryError: the path would leave the root or pass through a symlink.
    """
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        raise RegistryError(f"path {rel!r} is not a relative path inside the registry at {str(root)!r}; refusing it")
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise RegistryError(f"path {rel!r} leaves the registry at {str(root)!r} or is malformed; refusing it")
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise RegistryError(
                f"{str(path)!r} is a symlink; the registry does not follow links (they could point outside {str(root)!r}): "
                "replace it with a real folder or file"
            )
    return path


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"digit-9"`` -> ("digit-9", None) (latest); ``"digit-9@2"`` -> ("digit-9", 2)."""
    name, sep, version = ref.partition("@")
    validate_name(name)
    if not sep:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise InvalidNameError(f"invalid version in {ref!r}: write name@N with N >= 1, e.g. 'digit-9@2'", name=ref)
    return name, int(version)


@dataclass
class RegistryEntry:
    name: str
    version: int
    kind: str  # "base" | "lora"
    path: str  # relative to the root, e.g. "digit-9/v1"
    files: dict[str, dict[str, object]]  # file name -> {"sha256": str, "size": int}
    base_fingerprint: str | None = None
    digit: int | None = None
    r: int | None = None
    lora_alpha: float | None = None
    created: str = ""
    metrics: dict[str, object] = field(default_factory=dict)
    source: dict[str, str] | None = None  # where a pulled entry came from: {"repo_id", "revision"}

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _check_files(files: object, where: str) -> dict[str, dict[str, object]]:
    if not isinstance(files, dict) or not files:
        raise RegistryError(f"{where}: 'files' must be a non-empty object of file name -> {{sha256, size}}")
    for fname, meta in files.items():
        validate_file_name(fname)
        if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str) or not SHA256_PATTERN.fullmatch(meta["sha256"]):
            raise RegistryError(f"{where}: file {fname!r} lacks a valid sha256")
        size = meta.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 1 << 50:
            raise RegistryError(f"{where}: file {fname!r} has an invalid size {size!r}")
    return files


def entry_from_dict(data: object, *, where: str, path: str | None = None) -> RegistryEntry:
    """A :class:`RegistryEntry` from index content (outside input), every field checked.

    ``path``: the folder the entry must name (the registry's ``<name>/v<version>``); ``None`` takes
    the derived one, whatever the data says (a remote index's paths mean the repo's layout).

    Raises:
        RegistryError: a field is missing, of the wrong type, or names a path it must not.
    """
    if not isinstance(data, dict):
        raise RegistryError(f"{where}: an entry must be a JSON object, got {type(data).__name__}")
    name = data.get("name")
    try:
        validate_name(name)  # type: ignore[arg-type]
    except InvalidNameError as exc:
        raise RegistryError(f"{where}: {exc}") from exc
    where = f"{where} entry {name!r}"
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise RegistryError(f"{where}: version must be an integer from 1 to {MAX_VERSION:,}, got {str(version)[:40]!r}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise RegistryError(f"{where}: kind must be one of {KINDS}, got {kind!r}")
    files = _check_files(data.get("files"), where)
    expected = f"{name}/v{version}"
    if path is not None and data.get("path") != path:
        raise RegistryError(f"{where}: path {data.get('path')!r} is not {path!r}; the index was edited or is corrupt: restore it")
    digit, r, alpha = data.get("digit"), data.get("r"), data.get("lora_alpha")
    if digit is not None and (isinstance(digit, bool) or not isinstance(digit, int) or not 0 <= digit <= 9):
        raise RegistryError(f"{where}: digit must be 0..9 or null, got {digit!r}")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise RegistryError(f"{where}: r must be a positive integer or null, got {r!r}")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise RegistryError(f"{where}: lora_alpha must be a number or null, got {alpha!r}")
    fingerprint = data.get("base_fingerprint")
    if fingerprint is not None and (not isinstance(fingerprint, str) or not SHA256_PATTERN.fullmatch(fingerprint)):
        raise RegistryError(f"{where}: base_fingerprint must be a sha256 hex string or null")
    metrics, created, source = data.get("metrics") or {}, data.get("created") or "", data.get("source")
    if not isinstance(metrics, dict) or not isinstance(created, str):
        raise RegistryError(f"{where}: metrics must be an object and created a string")
    if source is not None and (
        not isinstance(source, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in source.items())
    ):
        raise RegistryError(f"{where}: source must be an object of strings or null")
    return RegistryEntry(
        name=name,
        version=version,
        kind=kind,
        path=expected,
        files=files,
        base_fingerprint=fingerprint,  # type: ignore[arg-type]
        digit=digit,
        r=r,
        lora_alpha=alpha,
        created=created,
        metrics=metrics,
        source=source,
    )


def _describe_folder(folder: Path) -> dict[str, object]:
    """kind, fingerprint, digit, r, lora_alpha read from a base or adapter folder."""
    from mnist_peft.io.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter

    if (folder / ADAPTER_CONFIG_NAME).is_file() and (folder / ADAPTER_WEIGHTS_NAME).is_file():
        files = read_adapter(folder)
        digit = files.metadata.get("digit")
        return {
            "kind": "lora",
            "base_fingerprint": files.base_fingerprint,
            "digit": int(digit) if digit is not None and digit.isdigit() else None,
            "r": files.config.r,
            "lora_alpha": files.config.lora_alpha,
        }
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        from mnist_peft.model.mlp import base_fingerprint, load_base

        return {"kind": "base", "base_fingerprint": base_fingerprint(load_base(folder))}
    raise RegistryError(
        f"{str(folder)!r} is neither an adapter folder (adapter_config.json + adapter_model.safetensors) nor a base "
        "model folder (config.json + model.safetensors)"
    )


class AdapterRegistry:
    """Versioned adapters and bases in a folder, with an ``index.json``.

    Example:
        >>> reg = AdapterRegistry("adapters")
        >>> entry = reg.add("digit-9", "out/digit-9", metrics={"accuracy": 0.987})
        >>> reg.path("digit-9")        # verified folder of the latest version
        PosixPath('adapters/digit-9/v1')
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    # -- index
    @property
    def index_path(self) -> Path:
        """The file the index lives in: ``index.db`` (or ``index.json`` for a registry made before it)."""
        return self._store().path

    def _lock(self, *, create: bool = False) -> FileLock:
        """The writers' lock; only ``add`` may create the root (any other write needs a registry)."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self._require_root()
        return FileLock(str(confine(self.root, LOCK_NAME)), timeout=60)

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise RegistryError(
                f"no registry at {str(self.root)!r} (the folder does not exist): check --root or $MNIST_PEFT_ADAPTERS, "
                "or create one with `mnist-peft registry add NAME FOLDER --root DIR`"
            )

    def _store(self) -> IndexStore:
        """``index.db``; ``index.json`` for a registry made before ``index.db`` (until its first write)."""
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

    def _writable_store(self) -> IndexStore:
        """The store writes go to (under the lock): a registry still on ``index.json`` moves to
        ``index.db`` first, its entries validated on the way; the JSON file is kept, renamed."""
        store = self._store()
        if isinstance(store, SqliteIndex) and store.exists():
            return store
        document: dict[str, object] = {"format": INDEX_FORMAT, "entries": [], "high_water": {}}
        if isinstance(store, JsonIndex):
            entries, marks = self._read()
            document = {"format": INDEX_FORMAT, "entries": [e.to_dict() for e in entries], "high_water": marks}
        db = SqliteIndex(confine(self.root, DB_NAME))
        db.create(document)  # made aside and renamed in: readers see the old index or the new one
        if isinstance(store, JsonIndex):
            os.replace(store.path, confine(self.root, IMPORTED_NAME))
        fsync_dir(self.root)
        return db

    def _read(self, name: str | None = None) -> tuple[list[RegistryEntry], dict[str, int]]:
        """The entries and high-water marks (of one name), validated (the index is outside input)."""
        self._require_root()
        try:
            return self._read_from(self._store(), name)
        except IndexMovedError:  # a writer moved index.json to index.db just now: read that
            return self._read_from(self._store(), name)

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
            known = sorted({e.name for e in self._read_index()})
            raise EntryNotFoundError(
                f"no registry entry {name!r} in {str(self.root)!r}; entries: {known or 'none'} (see `mnist-peft registry list`)", name=name
            )
        if version is None:
            return max(versions, key=lambda e: e.version)
        for e in versions:
            if e.version == version:
                return e
        raise EntryNotFoundError(f"{name!r} has no version {version}; versions: {sorted(e.version for e in versions)}", name=ref)

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
        """Raise :class:`IntegrityError` naming the first missing, resized, altered or linked file."""
        try:
            folder = self.folder(entry)
        except RegistryError as exc:
            raise IntegrityError(f"{entry.ref}: {exc}", path=self.root / entry.name) from exc
        paths = {fname: self._file_path(entry, fname) for fname in entry.files}
        if not folder.is_dir():
            raise IntegrityError(f"{entry.ref}: folder {str(folder)!r} is missing; re-add or pull the entry again", path=folder)
        for fname, info in entry.files.items():
            p = paths[fname]
            if not p.is_file():
                raise _missing(entry, p)
            _check_recorded(entry, p, info, p.stat().st_size, lambda p=p: sha256_file(p))

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

    # -- writes
    def add(
        self,
        name: str,
        folder: str | os.PathLike[str],
        *,
        metrics: dict[str, object] | None = None,
        digit: int | None = None,
        files: list[str] | None = None,
        source: dict[str, str] | None = None,
    ) -> RegistryEntry:
        """Copy a base or adapter folder in as the next version of ``name`` (never overwriting one).

        Args:
            files: copy only these file names (default: every file at the folder's top level).
            source: where the folder came from (e.g. ``{"repo_id": ..., "revision": ...}``).
        """
        return self.add_many([(name, folder, {"metrics": metrics, "digit": digit, "files": files, "source": source})])[0]

    def add_many(self, items: list[tuple[str, str | os.PathLike[str], dict[str, object]]]) -> list[RegistryEntry]:
        """Add several folders under one lock and one index write: all of them or none.

        Each item is ``(name, folder, options)`` with the options of :meth:`add`. A new version is
        one above every version the name ever had (removed ones included); a folder in the way
        that the index does not list is left alone, and the next free number is taken.
        """
        prepared = [_prepare(name, Path(folder), opts) for name, folder, opts in items]  # every check before the lock
        added: list[RegistryEntry] = []
        with self._lock(create=True):
            store = self._writable_store()
            entries, marks = [], {}
            for name in dict.fromkeys(item[0] for item in prepared):  # only the names being added are read
                some, their_marks = self._read(name)
                entries += some
                marks.update(their_marks)
            staging_root = self._staging_root()
            try:
                for name, src, info, names, metrics, source in prepared:
                    parent = confine(self.root, name)
                    if parent.exists() and not parent.is_dir():
                        raise RegistryError(f"{str(parent)!r} is in the way of entry {name!r} and is not a folder; move it away")
                    version = 1 + max([marks.get(name, 0), *(e.version for e in [*entries, *added] if e.name == name)])
                    while os.path.lexists(confine(self.root, f"{name}/v{version}")):
                        version += 1  # not ours (the index does not list it): never deleted, skipped
                    parent.mkdir(exist_ok=True)
                    files = self._place(name, version, src, names, staging_root)
                    added.append(_new_entry(name, version, info, files, metrics, source))
                store.write(add=[e.to_dict() for e in added], marks={e.name: max(marks.get(e.name, 0), e.version) for e in added})
            except BaseException:
                for e in added:  # nothing of a failed batch stays behind (these folders are ours: just made)
                    _remove_version(self.root, e.name, e.version)
                raise
        return added

    def _staging_root(self) -> Path:
        """``<root>/.staging``, made if missing, with leftovers of killed writers cleaned (under the lock)."""
        staging_root = confine(self.root, STAGING_DIR)
        if os.path.lexists(staging_root) and not staging_root.is_dir():
            raise RegistryError(f"{str(staging_root)!r} is in the way of the registry's staging folder and is not a folder; move it away")
        staging_root.mkdir(exist_ok=True)
        self._clean_staging()
        return staging_root

    def _place(self, name: str, version: int, src: Path, names: list[str], staging_root: Path) -> dict[str, dict[str, object]]:
        """Copy ``names`` from ``src`` into a staging folder (fsynced, hashed), then rename it to
        ``<name>/v<version>``; returns the files' sha256 and sizes. A failure leaves nothing."""
        staging = Path(tempfile.mkdtemp(dir=staging_root, prefix=STAGING_PREFIX))
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700
        (staging / STAGING_MARKER).touch()
        try:
            files: dict[str, dict[str, object]] = {}
            for fname in names:
                shutil.copyfile(src / fname, staging / fname, follow_symlinks=False)
                with open(staging / fname, "rb") as f:
                    os.fsync(f.fileno())
                files[fname] = {"sha256": sha256_file(staging / fname), "size": (staging / fname).stat().st_size}
            (staging / STAGING_MARKER).unlink()
            fsync_dir(staging)
            with _entry_dir_fd(self.root, name) as name_fd, _dir_fd(staging_root) as staging_fd:
                if name_fd is None:
                    raise RegistryError(f"{str(confine(self.root, name))!r} vanished while adding {name!r}; try again")
                # Relative to folders opened without following links: a link swapped in after the
                # checks cannot redirect the rename.
                os.replace(staging.name, f"v{version}", src_dir_fd=staging_fd, dst_dir_fd=name_fd)
                os.fsync(name_fd)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return files

    def _clean_staging(self) -> None:
        """Remove staging folders of writers killed mid-add (called under the lock, so no live
        writer owns one). Only real folders holding this registry's marker are removed: a link or
        a folder of the user's that happens to be in ``.staging/`` is left alone."""
        for p in confine(self.root, STAGING_DIR).glob(STAGING_PREFIX + "*"):
            if p.is_dir() and not p.is_symlink() and (p / STAGING_MARKER).is_file():
                shutil.rmtree(p, ignore_errors=True)

    def remove(self, ref: str) -> list[RegistryEntry]:
        """Remove ``name@version``, or every version of ``name``; returns what was removed.

        Every folder is confined before anything changes: an entry whose folder is a symlink is
        refused, not followed, and the deletion itself works relative to folders opened without
        following links. The version numbers stay used (``name@N`` never names other bytes).
        """
        name, version = parse_ref(ref)
        with self._lock():
            entries, marks = self._read(name)
            gone = [e for e in entries if version is None or e.version == version]
            if not gone:
                self.get(ref)  # raises the not-found error with the known names (before any change)
            store = self._writable_store()
            for e in gone:
                self.folder(e)  # refuses links before anything is written
            with _entry_dir_fd(self.root, name):
                pass  # the name folder opens without following links (or is already gone)
            # The index first: a crash leaves only orphan files. The marks keep the removed versions used.
            store.write(remove=[(e.name, e.version) for e in gone], marks={name: marks.get(name, 0)})
            for e in gone:
                _remove_version(self.root, name, e.version)
            fsync_dir(self.root)
        return gone


def _missing(entry: RegistryEntry, p: Path) -> IntegrityError:
    return IntegrityError(f"{entry.ref}: file {str(p)!r} is missing; re-add or pull the entry again", path=p)


def _check_recorded(entry: RegistryEntry, p: Path, info: dict[str, object], size: int, digest: Callable[[], str]) -> None:
    """Raise :class:`IntegrityError` unless a file of ``size`` bytes (and, only then, ``digest()``) is
    what the index records for it in ``info``."""
    if size != info["size"]:
        raise IntegrityError(f"{entry.ref}: file {str(p)!r} has {size} bytes, the index says {info['size']} (truncated?)", path=p)
    if digest() != info["sha256"]:
        raise IntegrityError(f"{entry.ref}: file {str(p)!r} does not match its recorded sha256 (corrupted or edited)", path=p)


def _prepare(name: str, src: Path, opts: dict[str, object]) -> tuple:
    """Check one item of :meth:`AdapterRegistry.add_many` and read what its entry records."""
    validate_name(name)
    if not src.is_dir():
        raise RegistryError(f"cannot add {str(src)!r}: not a folder; pass a base or adapter folder")
    info = _describe_folder(src)
    if opts.get("digit") is not None:
        info["digit"] = opts["digit"]
    names = opts.get("files") or sorted(p.name for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    for fname in names:  # type: ignore[union-attr]
        validate_file_name(fname)
        if (src / fname).is_symlink():
            raise RegistryError(f"cannot add {str(src / fname)!r}: it is a symlink; copy the file itself into the folder")
    missing = [f for f in names if not (src / f).is_file()]  # type: ignore[union-attr]
    if missing:
        raise RegistryError(f"cannot add {str(src)!r}: missing {missing}")
    return (name, src, info, names, dict(opts.get("metrics") or {}), opts.get("source"))  # type: ignore[call-overload]


def _new_entry(
    name: str, version: int, info: dict[str, object], files: dict[str, dict[str, object]], metrics: dict, source: dict | None
) -> RegistryEntry:
    return RegistryEntry(
        name=name,
        version=version,
        kind=str(info["kind"]),
        path=f"{name}/v{version}",
        files=files,
        base_fingerprint=info.get("base_fingerprint"),  # type: ignore[arg-type]
        digit=info.get("digit"),  # type: ignore[arg-type]
        r=info.get("r"),  # type: ignore[arg-type]
        lora_alpha=info.get("lora_alpha"),  # type: ignore[arg-type]
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        metrics=metrics,
        source=source,
    )


@contextlib.contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def _entry_dir_fd(root: Path, name: str) -> Iterator[int | None]:
    """``root/name`` opened without following a link (``None`` if it does not exist).

    Raises:
        RegistryError: it is a symlink or not a folder.
    """
    with _dir_fd(root) as root_fd:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
        except FileNotFoundError:
            yield None
            return
        except OSError as exc:  # ELOOP (a link) or ENOTDIR
            raise RegistryError(f"{str(root / name)!r} is a symlink or not a folder; the registry does not follow links") from exc
        try:
            yield fd
        finally:
            os.close(fd)


def _remove_version(root: Path, name: str, version: int) -> None:
    """Delete ``root/name/v<version>`` and then ``root/name`` if empty, never through a link."""
    with _entry_dir_fd(root, name) as name_fd:
        if name_fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(f"v{version}", dir_fd=name_fd)  # fd-based: refuses a link at v<version> itself
        empty = not os.listdir(name_fd)
    if empty:
        with _dir_fd(root) as root_fd, contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=root_fd)

"""The registry's writes: ``add``/``add_many`` (staged copies renamed into place, one index write)
and ``remove``, serialised with a file lock, never following a link, deleting only what they made."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from mnist_peft.errors import RegistryError
from mnist_peft.fileio import current_umask, fsync_dir, sha256_file

from .entry import RegistryEntry
from .names import MAX_VERSION, confine, highest_version_folder, parse_ref, validate_file_name, validate_name
from .reads import RegistryReads
from .stacks import STACK_FILE, STACK_FILES, describe_stack_folder
from .stores.base import INDEX_FORMAT, IndexStore, empty_document

__all__ = ["LOCK_NAME", "STAGING_DIR", "STAGING_MARKER", "STAGING_PREFIX", "RegistryWrites"]

LOCK_NAME = ".index.lock"
STAGING_DIR = ".staging"
STAGING_PREFIX = "add-"
STAGING_MARKER = ".mnist-peft-staging"  # inside every staging folder this registry makes


class RegistryWrites(RegistryReads):
    """Adds and removals below ``self.root``, recorded in ``self.store`` (part of
    :class:`~mnist_peft.registry.adapter_registry.AdapterRegistry`; a write reads the versions it
    numbers from, hence the reads underneath)."""

    def _lock(self, *, create: bool = False) -> FileLock:
        """The writers' lock; only ``add`` may create the root (any other write needs a registry)."""
        if create:
            self.root.mkdir(parents=True, exist_ok=True)
        else:
            self._require_root()
        return FileLock(str(confine(self.root, LOCK_NAME)), timeout=60)

    def writable_store(self) -> IndexStore:
        """The store, ready for writes (under the lock): one with no index yet, or an index in an
        older form (``index.json``), is created first, the old index's entries validated on the way."""
        if self.store.writable():
            return self.store
        document = empty_document()
        if self.store.exists():
            entries, marks = self._read()
            document = {"format": INDEX_FORMAT, "entries": [e.to_dict() for e in entries], "high_water": marks}
        self.store.create(document)  # made aside and renamed in: readers see the old index or the new one
        return self.store

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
        one above every version the name ever had: the index's high-water mark (removed versions
        included) and every ``<name>/v<N>`` on disk, listed or not (such a folder is left alone), so
        an index that lost its marks still never hands out a number twice. An item's options may
        name the ``version`` it wants (a pull keeps the remote number): it gets it when that number
        is above all of those and at most :data:`MAX_VERSION_JUMP` above, else the next one (compare
        the returned entries' versions).
        """
        prepared = [_prepare(name, Path(folder), opts) for name, folder, opts in items]  # every check before the lock
        wanted = [_wanted_version(opts) for _, _, opts in items]
        added: list[RegistryEntry] = []
        with self._lock(create=True):
            store = self.writable_store()
            entries, marks = [], {}
            for name in dict.fromkeys(item[0] for item in prepared):  # only the names being added are read
                some, their_marks = self._read(name)
                entries += some
                marks.update(their_marks)
            staging_root = self._staging_root()
            try:
                for (name, src, info, names, metrics, source), want in zip(prepared, wanted, strict=True):
                    parent = confine(self.root, name)
                    if parent.exists() and not parent.is_dir():
                        raise RegistryError(f"{str(parent)!r} is in the way of entry {name!r} and is not a folder; move it away")
                    _refuse_kind_change(name, str(info["kind"]), [e for e in [*entries, *added] if e.name == name])
                    listed = [e.version for e in [*entries, *added] if e.name == name]
                    following = 1 + max([marks.get(name, 0), highest_version_folder(self.root, name), *listed])
                    # a wanted number far ahead would spend the name's numbers (a hostile remote's 1e9): the next one instead
                    version = want if following <= want <= following + MAX_VERSION_JUMP else following
                    if version > MAX_VERSION:
                        raise RegistryError(f"{name!r} has used every version number up to {MAX_VERSION:,}; add it under another name")
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

        It reads one name's rows, never the stacks that may pin it (a removed member makes its stack
        fail ``verify``, which names it; ``registry rm`` asks
        :func:`~mnist_peft.registry.stacks.refuse_pinned` first). Removing a stack touches none of its
        members. Every folder is confined before anything changes: an entry whose folder is a symlink is
        refused, not followed, and the deletion itself works relative to folders opened without
        following links. The version numbers stay used (``name@N`` never names other bytes).
        """
        name, version = parse_ref(ref)
        with self._lock():
            entries, marks = self._read(name)
            gone = [e for e in entries if version is None or e.version == version]
            if not gone:
                self.get(ref)  # raises the not-found error with the known names (before any change)
            store = self.writable_store()
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


class DigitMismatchWarning(UserWarning):
    """An entry named ``digit-N`` is added for an adapter that records another digit (a name is
    the user's choice, so this is a warning, not a refusal; the CLI prints it as ``warning: ...``)."""


def _describe_folder(folder: Path) -> dict[str, object]:
    """kind, fingerprint, digit, r, lora_alpha, adapter_type read from a base or adapter folder, whose numbers are
    checked first: a base with a NaN or Inf weight, or an adapter with one or whose outputs on the
    probe batch are not finite or too large (``io.probe``), is refused (:class:`NonFiniteError`). A
    stack folder's ``stack.json`` is checked as outside input (its members are not looked up: a
    pulled stack may come before them; ``verify`` names the missing ones)."""
    if (folder / STACK_FILE).is_file():
        others = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name not in STACK_FILES)
        if others:
            raise RegistryError(
                f"{str(folder)!r} holds a {STACK_FILE} and {others}; a stack folder holds only {sorted(STACK_FILES)} "
                "(add adapters and stacks from separate folders)"
            )
        return describe_stack_folder(folder)  # torch-free: a stack is no tensors
    from mnist_peft.io.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter
    from mnist_peft.io.probe import PROBE_FIX, probe_adapter
    from mnist_peft.numerics import require_finite

    if (folder / ADAPTER_CONFIG_NAME).is_file() and (folder / ADAPTER_WEIGHTS_NAME).is_file():
        files = read_adapter(folder)
        require_finite(files.state_dict, what=f"adapter {str(folder)!r}", fix=PROBE_FIX, path=str(folder))
        probe_adapter(files)
        digit = files.metadata.get("digit")
        return {
            "kind": "lora",
            "base_fingerprint": files.base_fingerprint,
            "digit": int(digit) if digit is not None and digit.isascii() and digit.isdigit() and len(digit) < 4 else None,
            "r": files.config.r,
            "lora_alpha": files.config.lora_alpha,
            "adapter_type": files.config.adapter_type,
        }
    if (folder / "model.safetensors").is_file() and (folder / "config.json").is_file():
        from mnist_peft.model.mlp import base_fingerprint, load_base

        return {"kind": "base", "base_fingerprint": base_fingerprint(load_base(folder))}
    raise RegistryError(
        f"{str(folder)!r} is neither an adapter folder (adapter_config.json + adapter_model.safetensors), nor a base "
        f"model folder (config.json + model.safetensors), nor a stack folder ({STACK_FILE}; make one with `mnist-peft registry add-stack`)"
    )


def _prepare(name: str, src: Path, opts: dict[str, object]) -> tuple:
    """Check one item of :meth:`AdapterRegistry.add_many` and read what its entry records."""
    validate_name(name)
    if not src.is_dir():
        raise RegistryError(f"cannot add {str(src)!r}: not a folder; pass a base or adapter folder")
    info = _describe_folder(src)
    if opts.get("digit") is not None:
        info["digit"] = opts["digit"]
    _warn_if_digit_differs(name, info.get("digit"))
    names = opts.get("files") or sorted(p.name for p in src.iterdir() if p.is_file() and not p.name.startswith("."))
    for fname in names:  # type: ignore[union-attr]
        validate_file_name(fname)
        if (src / fname).is_symlink():
            raise RegistryError(f"cannot add {str(src / fname)!r}: it is a symlink; copy the file itself into the folder")
    if info["kind"] == "stack" and not set(names) <= STACK_FILES:  # type: ignore[arg-type]
        raise RegistryError(f"cannot add {sorted(set(names) - STACK_FILES)} to stack {name!r}: a stack holds only {sorted(STACK_FILES)}")  # type: ignore[arg-type]
    missing = [f for f in names if not (src / f).is_file()]  # type: ignore[union-attr]
    if missing:
        raise RegistryError(f"cannot add {str(src)!r}: missing {missing}")
    return (name, src, info, names, dict(opts.get("metrics") or {}), opts.get("source"))  # type: ignore[call-overload]


def _warn_if_digit_differs(name: str, digit: object) -> None:
    """:class:`DigitMismatchWarning` when ``name`` reads ``digit-N`` and the adapter records another digit."""
    import re
    import warnings

    named = re.match(r"digit-([0-9])(?![0-9])", name)
    if named and isinstance(digit, int) and digit != int(named.group(1)):
        warnings.warn(
            DigitMismatchWarning(
                f"entry {name!r} is named for digit {named.group(1)}, but the adapter records digit {digit}; "
                "check that this is the adapter you meant (or name the entry after its digit)"
            ),
            stacklevel=5,  # the caller of add() / add_many()
        )


def _refuse_kind_change(name: str, kind: str, existing: list[RegistryEntry]) -> None:
    """A name holds stacks or holds no stack: ``digit-9`` (an adapter in a spec) never turns into a
    stack of other adapters at its next version, nor a stack's name into a single adapter."""
    other = next((e for e in existing if (e.kind == "stack") != (kind == "stack")), None)
    if other is not None:
        raise RegistryError(
            f"{name!r} holds {other.kind} entries ({other.ref}); a {kind} cannot be its next version (a spec naming {name!r} "
            f"would change meaning): pick another name, or remove the old versions first (`mnist-peft registry rm {name}`)"
        )


MAX_VERSION_JUMP = 10_000
"""How far above a name's next free version a wanted (pulled) version may lie and still be kept."""


def _wanted_version(opts: dict[str, object]) -> int:
    """The ``version`` an item of :meth:`~RegistryWrites.add_many` asks for (0: none), checked."""
    want = opts.get("version")
    if want is None:
        return 0
    if isinstance(want, bool) or not isinstance(want, int) or not 1 <= want <= MAX_VERSION:
        raise RegistryError(f"a wanted version must be an integer from 1 to {MAX_VERSION:,}, got {str(want)[:40]!r}")
    return want


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
        adapter_type=info.get("adapter_type"),  # type: ignore[arg-type]
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

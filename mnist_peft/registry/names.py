"""Names in a registry: entry names, file names, references (``name@N``), the registry's own files,
and :func:`confine`, the one gate for every path the registry and the Hub sync touch below a root."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mnist_peft.errors import InvalidNameError, RegistryError, shown  # shown: defined below io, handed on here

__all__ = [
    "DB_NAME",
    "ENV_ROOT",
    "IMPORTED_NAME",
    "INDEX_NAME",
    "MAX_VERSION",
    "NAME_PATTERN",
    "RESERVED_NAMES",
    "confine",
    "default_root",
    "entry_folders",
    "highest_version_folder",
    "parse_ref",
    "parse_version",
    "shown",
    "validate_file_name",
    "validate_name",
]

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
INDEX_NAME = "index.json"  # the exchange format (export, Hub repos, registries made before index.db)
DB_NAME = "index.db"
IMPORTED_NAME = "index.json.imported"  # an old index.json, kept after its move to index.db
RESERVED_NAMES = frozenset({INDEX_NAME, DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal", IMPORTED_NAME})
ENV_ROOT = "MNIST_PEFT_ADAPTERS"
MAX_VERSION = 10**9  # a version number beyond this is not one the registry writes
VERSION_PATTERN = re.compile(r"[0-9]{1,10}")  # ASCII digits only ('²', '١', '𝟏' are not versions), at most 10 of them
VERSION_FOLDER = re.compile(r"v([0-9]{1,10})")  # an entry's folder, <name>/v<N>
VERSION_RULE = f"a version is a whole number from 1 to {MAX_VERSION:,} written in ASCII digits (e.g. 'digit-9@2')"


def default_root() -> Path:
    """``$MNIST_PEFT_ADAPTERS``, else ``./adapters``."""
    return Path(os.environ.get(ENV_ROOT) or "adapters")


def validate_name(name: str) -> str:
    """A registry name: ``[a-z0-9][a-z0-9._-]*``, no path separators, not ``.``/``..``-like."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name or len(name) > 100:
        raise InvalidNameError(
            f"invalid registry name {shown(name)}: use lowercase letters, digits, '.', '_' and '-', starting with a "
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
    """``"digit-9"`` -> ("digit-9", None) (latest); ``"digit-9@2"`` -> ("digit-9", 2).

    Raises:
        InvalidNameError: the name is invalid, or the version is not :func:`parse_version`'s.
    """
    if not isinstance(ref, str):
        raise InvalidNameError(f"invalid registry reference {shown(ref)}: write name or name@N, e.g. 'digit-9@2'", name=str(ref))
    name, sep, version = ref.partition("@")
    validate_name(name)
    return name, (parse_version(version, ref=ref) if sep else None)


def parse_version(text: str, *, ref: str | None = None) -> int:
    """The one reading of a version written as text (``name@N``, a ``vN`` folder or tag): 1 to
    10 ASCII digits, from 1 to :data:`MAX_VERSION`. ``str.isdigit`` would take '²' (then ``int``
    fails) and '١' or '𝟏' (``int`` reads them as 1), and ``int`` of 5,000 digits is Python's own error.

    Raises:
        InvalidNameError: anything else, named with the rule.
    """
    if not isinstance(text, str) or not VERSION_PATTERN.fullmatch(text) or not 1 <= int(text) <= MAX_VERSION:
        where = f" in {shown(ref)}" if ref is not None else ""
        raise InvalidNameError(f"invalid version {shown(text)}{where}: {VERSION_RULE}", name=str(ref if ref is not None else text)[:200])
    return int(text)


def highest_version_folder(root: Path, name: str) -> int:
    """The highest N of any ``<root>/<name>/v<N>`` on disk (a folder, a file or a link: any of them
    makes N used), 0 if none: what keeps versions unique when the index has lost its marks."""
    parent = confine(root, name)
    if not parent.is_dir():
        return 0
    try:
        with os.scandir(parent) as found:
            numbers = [int(m.group(1)) for e in found if (m := VERSION_FOLDER.fullmatch(e.name))]
    except OSError as exc:
        raise RegistryError(f"cannot list {str(parent)!r} ({exc.strerror or exc}); the registry must read its entry folders") from exc
    return max((n for n in numbers if n <= MAX_VERSION), default=0)


def entry_folders(root: Path, *, limit: int = 3) -> list[str]:
    """Up to ``limit`` entry folders (``<name>/v<N>``, real folders) found below ``root``."""
    held: list[str] = []
    if not root.is_dir():
        return held
    with os.scandir(root) as names:
        for d in names:
            if not (d.is_dir(follow_symlinks=False) and NAME_PATTERN.fullmatch(d.name) and d.name not in RESERVED_NAMES):
                continue
            try:
                with os.scandir(d.path) as versions:
                    held += [f"{d.name}/{v.name}" for v in versions if VERSION_FOLDER.fullmatch(v.name) and v.is_dir(follow_symlinks=False)]
            except OSError:  # a folder this user cannot list is no evidence either way
                continue
            if len(held) >= limit:
                break
    return sorted(held)[:limit]

"""Names in a registry: entry names, file names, references (``name@N``), the registry's own files,
and :func:`confine`, the one gate for every path the registry and the Hub sync touch below a root."""

from __future__ import annotations

import os
import re
from pathlib import Path

from mnist_peft.errors import InvalidNameError, RegistryError

__all__ = [
    "DB_NAME",
    "ENV_ROOT",
    "IMPORTED_NAME",
    "INDEX_NAME",
    "NAME_PATTERN",
    "RESERVED_NAMES",
    "confine",
    "default_root",
    "parse_ref",
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

"""Small file helpers used everywhere: atomic writes and sha256 of files."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import sys
import tempfile
from pathlib import Path

__all__ = [
    "progress_enabled",
    "read_regular_file",
    "current_umask",
    "fsync_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "sha256_file",
    "sha256_bytes",
]


def progress_enabled(quiet: bool = False) -> bool:
    """Progress bars only for a person watching: not with ``--quiet`` and not when piped."""
    return not quiet and sys.stdout.isatty() and sys.stderr.isatty()


def read_regular_file(path: str) -> bytes:
    """The bytes of the regular file at ``path``.

    Opened without blocking and checked to be a regular file before it is read, so a FIFO or a
    device planted under an expected name is refused instead of hanging the reader.

    Raises:
        FileNotFoundError: nothing is there; IsADirectoryError / OSError: something other than a
        regular file is.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file", path)
        chunks = []
        while chunk := os.read(fd, max(st.st_size, 1 << 16)):
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, rename.

    A reader sees the old file or the new one, never a half-written one; a writer killed mid-way
    leaves the old file (and at worst a stray ``.tmp`` file) behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; a normal file follows the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power loss only once the folder is synced
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so that renames into it are durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: object) -> Path:
    """Sorted, indented JSON with a trailing newline, written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

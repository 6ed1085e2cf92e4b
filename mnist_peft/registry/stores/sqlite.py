"""``index.db``: the registry's index in SQLite (:class:`SqliteIndex`, WAL mode).

Looking up a name or adding a version touches only that name's rows through the primary key, so
neither grows with the size of the registry (``mnist-peft bench --only registry_add registry_get``
measures 10,000 entries against 10). Each write is one transaction: a crash leaves the old index or
the new one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

from mnist_peft.errors import RegistryError
from mnist_peft.fileio import current_umask

from .base import INDEX_FORMAT, document_parts, empty_document, int_or_zero, sort_key, unreadable

__all__ = ["SqliteIndex"]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (name TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL,"
    " PRIMARY KEY (name, version)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS high_water (name TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID",
)


class SqliteIndex:
    """``index.db``: entries and marks in SQLite (WAL journal, full sync on commit)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.is_file()

    def writable(self) -> bool:
        return self.exists()

    def create(self, document: dict[str, object] | None = None) -> None:
        """Make the database, with its tables, WAL mode, the umask's file mode and ``document``'s
        content, under a temporary name, then rename it into place: ``index.db`` is never seen
        half-made (a writer killed meanwhile leaves the old index, or none, in force)."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".index-new-", suffix=".db")
        os.close(fd)
        os.unlink(tmp)
        try:
            staged = SqliteIndex(Path(tmp))
            with closing(sqlite3.connect(tmp, isolation_level=None)) as c:
                c.execute("PRAGMA journal_mode=WAL")
                for statement in _SCHEMA:
                    c.execute(statement)
            os.chmod(tmp, 0o666 & ~current_umask())  # a normal file follows the umask
            staged.load(document or empty_document())
            with closing(sqlite3.connect(tmp)) as c:  # fold the log into the file before it moves
                c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            os.replace(tmp, self.path)
        finally:
            for leftover in (tmp, f"{tmp}-wal", f"{tmp}-shm"):
                if os.path.lexists(leftover):
                    os.unlink(leftover)

    @contextmanager
    def _connect(self, *, create: bool = False) -> Iterator[sqlite3.Connection]:
        for companion in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            if companion.is_symlink():  # SQLite would write through it
                raise RegistryError(f"{str(companion)!r} is a symlink; the registry does not follow links: replace it with the real file")
        if not self.path.is_file():  # never created here by connecting: see create()
            raise RegistryError(f"registry index {str(self.path)!r} is missing or not a file; restore it from a backup")
        read_only = not create and not os.access(self.path.parent, os.W_OK)
        try:
            if read_only:
                connection = self._connect_read_only()
            else:
                connection = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error as exc:
            raise unreadable(self.path, exc) from exc
        with closing(connection):
            try:
                if create:  # a writer: WAL (a no-op once set), whatever an older writer left
                    connection.execute("PRAGMA journal_mode=WAL")
                if not read_only:
                    connection.execute("PRAGMA synchronous=FULL")
                yield connection
            except sqlite3.Error as exc:  # not a database, a damaged page, a locked file
                if read_only:
                    raise RegistryError(
                        f"registry index {str(self.path)!r} cannot be read from its read-only folder ({exc}); "
                        "copy the registry to a writable folder, or mount it read-write"
                    ) from exc
                raise unreadable(self.path, exc) from exc

    def _connect_read_only(self) -> sqlite3.Connection:
        """A reader's connection when the folder is not writable (a read-only mount, a shared copy).

        SQLite's WAL mode needs to create ``index.db-shm`` next to the database even to read it, so
        a plain connection fails there ("unable to open database file"). Opened ``immutable`` it
        reads the file alone, taking no lock: right when nobody can write the folder either. A
        write-ahead log left non-empty (a writer that never closed) holds changes the file lacks,
        and is refused rather than silently ignored.
        """
        from urllib.parse import quote

        wal = Path(f"{self.path}-wal")
        if wal.is_file() and wal.stat().st_size > 0:
            raise RegistryError(
                f"registry index {str(self.path)!r} is in a read-only folder with unfinished writes in {wal.name}; "
                "open the registry once where it is writable (e.g. `mnist-peft registry list` on a writable copy) to fold them in"
            )
        return sqlite3.connect(f"file:{quote(str(self.path.absolute()))}?mode=ro&immutable=1", uri=True, isolation_level=None)

    def _rows(self, connection: sqlite3.Connection, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return connection.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise

    def entries(self, name: str | None = None) -> list[object]:
        with self._connect() as c:
            rows = (
                self._rows(c, "SELECT name, version, body FROM entries")
                if name is None
                else self._rows(c, "SELECT name, version, body FROM entries WHERE name = ?", (name,))
            )
        return [_row_entry(self.path, *row) for row in rows]

    def marks(self, name: str | None = None) -> dict[str, object]:
        with self._connect() as c:
            rows = (
                self._rows(c, "SELECT name, version FROM high_water")
                if name is None
                else self._rows(c, "SELECT name, version FROM high_water WHERE name = ?", (name,))
            )
        return dict(rows)

    def write(self, *, add: Sequence[dict[str, object]] = (), remove: Sequence[tuple[str, int]] = (), marks: dict[str, int]) -> None:
        with self._connect(create=True) as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    c.execute(statement)
                c.executemany("DELETE FROM entries WHERE name = ? AND version = ?", list(remove))
                c.executemany(
                    "INSERT INTO entries (name, version, body) VALUES (?, ?, ?)",
                    [(e["name"], e["version"], json.dumps(e, sort_keys=True)) for e in add],
                )
                c.executemany(
                    "INSERT INTO high_water (name, version) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET version = max(version, excluded.version)",
                    list(marks.items()),
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def dump(self) -> dict[str, object]:
        entries = sorted(self.entries(), key=sort_key)
        return {"format": INDEX_FORMAT, "entries": entries, "high_water": dict(sorted(self.marks().items()))}

    def load(self, document: dict[str, object]) -> None:
        entries, marks = document_parts(self.path, document)
        with self._connect(create=True) as c:
            c.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    c.execute(statement)
                c.execute("DELETE FROM entries")
                c.execute("DELETE FROM high_water")
                c.executemany(
                    "INSERT OR REPLACE INTO entries (name, version, body) VALUES (?, ?, ?)",
                    [(str(e.get("name")), int_or_zero(e.get("version")), json.dumps(e)) for e in entries if isinstance(e, dict)],
                )
                c.executemany("INSERT OR REPLACE INTO high_water (name, version) VALUES (?, ?)", [(str(k), v) for k, v in marks.items()])
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise


def _row_entry(path: Path, name: object, version: object, body: object) -> object:
    """One row's entry; a row whose body disagrees with its key is reported as such."""
    try:
        entry = json.loads(body) if isinstance(body, (str, bytes)) else None
    except (ValueError, RecursionError) as exc:
        raise unreadable(path, exc) from exc
    if not isinstance(entry, dict):
        raise RegistryError(f"registry index {str(path)!r} has a row for {name}@{version} that is not an entry; restore it")
    body_version = entry.get("version")
    key_version = (
        body_version if isinstance(body_version, int) and not isinstance(body_version, bool) and -(2**63) <= body_version < 2**63 else None
    )
    if entry.get("name") != name or (key_version is not None and key_version != version):  # else the registry names the bad field
        raise RegistryError(f"registry index {str(path)!r} has a row for {name}@{version} that names another entry; restore it")
    return entry

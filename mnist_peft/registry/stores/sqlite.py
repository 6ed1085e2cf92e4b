"""``index.db``: the registry's index in SQLite (:class:`SqliteIndex`, WAL mode).

Looking up a name or adding a version touches only that name's rows through the primary key, so
neither grows with the size of the registry (``mnist-peft bench --only registry_add registry_get``
measures 10,000 entries against 10). Each write is one transaction: a crash leaves the old index or
the new one.

A database file is outside input like any other: it is read only when its schema is exactly the one
written here (the tables below and a format row, nothing else: no view, no trigger, no index), with
``trusted_schema`` off, checked from ``sqlite_master`` before any other statement. So an empty file
or one whose tables were dropped is an error, never an empty registry, and no SQL stored in the file
runs. An index made before the format row (the two tables alone) is read as it is and given the row
on its next write.
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

from ..names import shown
from .base import INDEX_FORMAT, document_parts, empty_document, int_or_zero, sort_key, unreadable

__all__ = ["SqliteIndex"]

# Each table as sqlite_master records it (SQLite stores the statement without "IF NOT EXISTS").
_TABLES = {
    "entries": "CREATE TABLE entries (name TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL,"
    " PRIMARY KEY (name, version)) WITHOUT ROWID",
    "high_water": "CREATE TABLE high_water (name TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID",
    "meta": "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
}
_LEGACY_TABLES = ("entries", "high_water")  # an index.db made before the format row
_SCHEMA = tuple(sql.replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ", 1) for sql in _TABLES.values())
_META_SCHEMA = _SCHEMA[list(_TABLES).index("meta")]
_FORMAT_ROW = ("format", str(INDEX_FORMAT))
_RESTORE = "restore index.db from a backup (the entry folders beside it are left as they are)"


class SqliteIndex:
    """``index.db``: entries and marks in SQLite (WAL journal, full sync on commit)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def exists(self) -> bool:
        return self.path.is_file()

    def writable(self) -> bool:
        return self.exists()

    def create(self, document: dict[str, object] | None = None) -> None:
        """Make the database, with its tables, format row, WAL mode, the umask's file mode and
        ``document``'s content, under a temporary name, then rename it into place: ``index.db`` is
        never seen half-made (a writer killed meanwhile leaves the old index, or none, in force)."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".index-new-", suffix=".db")
        os.close(fd)
        os.unlink(tmp)
        try:
            staged = SqliteIndex(Path(tmp))
            with closing(sqlite3.connect(tmp, isolation_level=None)) as c:
                c.execute("PRAGMA trusted_schema=OFF")  # every connection, this file's own included
                c.execute("PRAGMA journal_mode=WAL")
                for statement in _SCHEMA:
                    c.execute(statement)
                c.execute("INSERT INTO meta (key, value) VALUES (?, ?)", _FORMAT_ROW)
            os.chmod(tmp, 0o666 & ~current_umask())  # a normal file follows the umask
            staged.load(document or empty_document())
            with closing(sqlite3.connect(tmp)) as c:  # fold the log into the file before it moves
                c.execute("PRAGMA trusted_schema=OFF")
                c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            os.replace(tmp, self.path)
        finally:
            for leftover in (tmp, f"{tmp}-wal", f"{tmp}-shm"):
                if os.path.lexists(leftover):
                    os.unlink(leftover)

    @contextmanager
    def _connect(self, *, write: bool = False, immutable: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction on a connection whose schema was checked first: a reader's snapshot
        (``BEGIN``) or a writer's (``BEGIN IMMEDIATE``, after WAL mode and full sync are set),
        committed at the end and rolled back on any error. A writer gives an index made before the
        format row its row (in the same transaction)."""
        for companion in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            if companion.is_symlink():  # SQLite would write through it
                raise RegistryError(f"{str(companion)!r} is a symlink; the registry does not follow links: replace it with the real file")
        if not self.path.is_file():  # never created here by connecting: see create()
            raise RegistryError(f"registry index {str(self.path)!r} is missing or not a file; {_RESTORE}")
        read_only = not write and not os.access(self.path.parent, os.W_OK)
        try:
            c = self._open_read_only(immutable) if read_only else sqlite3.connect(self.path, timeout=60, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._error(exc, read_only) from exc
        with closing(c):
            try:
                c.execute("PRAGMA trusted_schema=OFF")  # no function of the file's schema runs (belt: nothing but ours passes)
                if write:
                    _check_schema(self.path, c)  # before anything changes the file (a WAL switch writes)
                    c.execute("PRAGMA journal_mode=WAL")  # a no-op once set, whatever an older writer left
                    c.execute("PRAGMA synchronous=FULL")
                c.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    if _check_schema(self.path, c) and write:  # the format row, given to an older index
                        c.execute(_META_SCHEMA)
                        c.execute("INSERT INTO meta (key, value) VALUES (?, ?)", _FORMAT_ROW)
                    yield c
                    c.execute("COMMIT")
                except BaseException:
                    if c.in_transaction:
                        c.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:  # not a database, a damaged page, a locked file
                raise self._error(exc, read_only) from exc

    def _open_read_only(self, immutable: bool = False) -> sqlite3.Connection:
        """A reader's connection when this process cannot write the folder (a shared registry
        another user writes, a read-only mount): ``mode=ro``, with SQLite's locking on, so a
        writer's commits are seen as they land and its checkpoints never tear a read. ``immutable``
        only for :meth:`_query`'s checked snapshot: it promises SQLite that nobody changes the file,
        which holds only while no writer is at work, so the caller checks that before and after."""
        from urllib.parse import quote

        flags = "mode=ro&immutable=1" if immutable else "mode=ro"
        return sqlite3.connect(f"file:{quote(str(self.path.absolute()))}?{flags}", uri=True, timeout=60, isolation_level=None)

    def _error(self, exc: sqlite3.Error, read_only: bool) -> RegistryError:
        code = str(getattr(exc, "sqlite_errorname", None) or "")
        if read_only and code.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN")):  # WAL mode needs index.db-shm, not makeable here
            return RegistryError(
                f"registry index {str(self.path)!r} cannot be read safely from a folder this user cannot write ({exc}): "
                "SQLite needs index.db-shm beside it to see other writers' changes; make the folder writable for this "
                "user (e.g. a group shared with the writer), or copy the registry to a writable folder and open the copy"
            )
        return unreadable(self.path, exc)

    def entries(self, name: str | None = None) -> list[object]:
        if name is None:
            rows = self._query("SELECT name, version, body FROM entries")
        else:
            rows = self._query("SELECT name, version, body FROM entries WHERE name = ?", (name,))
        return [_row_entry(self.path, *row) for row in rows]

    def marks(self, name: str | None = None) -> dict[str, object]:
        if name is None:
            return dict(self._query("SELECT name, version FROM high_water"))
        return dict(self._query("SELECT name, version FROM high_water WHERE name = ?", (name,)))

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        """The rows of one read, in one snapshot.

        Where this process cannot write the folder and no writer is at work (no ``index.db-wal``: a
        read-only mount, a registry shipped with an image), SQLite's ``mode=ro`` cannot open a WAL
        database (it must make ``index.db-shm``), so the file is read ``immutable`` and the answer
        kept only if nothing changed meanwhile: a writer's first change makes ``index.db-wal``, and
        only a checkpoint touches ``index.db`` itself (its size or times change). Otherwise, or
        after three changed tries, ``mode=ro`` with SQLite's locks, which sees a writer's commits.
        """
        if not os.access(self.path.parent, os.W_OK):
            for _ in range(3):
                before = _quiet_signature(self.path)
                if before is None:  # a writer is at work: SQLite's locks, not a snapshot of the file
                    break
                try:
                    with self._connect(immutable=True) as c:
                        rows = c.execute(sql, args).fetchall()
                except RegistryError:  # a checkpoint can tear the snapshot: corrupt only if nothing changed
                    if _quiet_signature(self.path) == before:
                        raise
                    continue
                if _quiet_signature(self.path) == before:
                    return rows
        with self._connect() as c:
            return c.execute(sql, args).fetchall()

    def write(self, *, add: Sequence[dict[str, object]] = (), remove: Sequence[tuple[str, int]] = (), marks: dict[str, int]) -> None:
        with self._connect(write=True) as c:
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

    def dump(self) -> dict[str, object]:
        entries = sorted(self.entries(), key=sort_key)
        return {"format": INDEX_FORMAT, "entries": entries, "high_water": dict(sorted(self.marks().items()))}

    def load(self, document: dict[str, object]) -> None:
        entries, marks = document_parts(self.path, document)
        with self._connect(write=True) as c:
            c.execute("DELETE FROM entries")
            c.execute("DELETE FROM high_water")
            c.executemany(
                "INSERT OR REPLACE INTO entries (name, version, body) VALUES (?, ?, ?)",
                [(str(e.get("name")), int_or_zero(e.get("version")), json.dumps(e)) for e in entries if isinstance(e, dict)],
            )
            c.executemany("INSERT OR REPLACE INTO high_water (name, version) VALUES (?, ?)", [(str(k), v) for k, v in marks.items()])


def _quiet_signature(path: Path) -> tuple[int, ...] | None:
    """What changes when a writer touches ``index.db`` (device, inode, size, times), or ``None`` while
    a writer is at work (its ``index.db-wal`` exists)."""
    if os.path.lexists(f"{path}-wal"):
        return None
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _check_schema(path: Path, c: sqlite3.Connection) -> bool:
    """Refuse any schema but the one written here; ``True`` for an index made before the format row.

    Only ``sqlite_master`` and (once the schema is known to be ours) ``meta`` are read: no view or
    trigger of the file's can run, and a file with any object but ours is refused unread.

    Raises:
        RegistryError: tables missing or other than ours, anything else in the schema, no format row
            or another one, naming the file and how to restore it.
    """
    found = {(str(t), str(n)): sql for t, n, sql in c.execute("SELECT type, name, sql FROM main.sqlite_master LIMIT 20").fetchall()}
    problem = _schema_problem(found)
    if problem:
        raise RegistryError(f"registry index {str(path)!r} is not an index as mnist-peft writes it ({problem}); it is not read: {_RESTORE}")
    if ("table", "meta") not in found:
        return True
    meta = c.execute("SELECT key, value FROM meta LIMIT 2").fetchall()
    if meta != [_FORMAT_ROW]:
        raise RegistryError(
            f"registry index {str(path)!r} has the format row(s) {shown(meta)}, not {[_FORMAT_ROW]!r} (written by another "
            f"version of mnist-peft, or damaged): open it with the version that wrote it, or {_RESTORE}"
        )
    return False


def _schema_problem(found: dict[tuple[str, str], object]) -> str:
    """What is wrong with a schema (``sqlite_master``'s (type, name) -> sql), or ``""``."""
    if not found:
        return "it has no tables: it is empty, or its tables were dropped"
    others = sorted(f"{t} {shown(n, 40)}" for t, n in found if t != "table" or n not in _TABLES)
    if others:
        return f"it holds {', '.join(others[:5])}{' and more' if len(others) > 5 else ''}, which mnist-peft never writes"
    changed = sorted(n for t, n in found if found[(t, n)] != _TABLES[n])
    if changed:
        return f"table {changed[0]!r} is not the one mnist-peft writes"
    missing = [n for n in _LEGACY_TABLES if ("table", n) not in found]
    return f"table {missing[0]!r} is missing" if missing else ""


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

"""The registry's index as outside input (issue 22): never mistaken for an empty one, never running
SQL stored in it, read correctly while another process writes, versions never reused, and version
numbers read one way (ASCII digits, bounded).

Each test here fails on the code before this change (1ad5fdf): a zero-byte or table-less
``index.db`` listed "0 entries" and the next add forgot every entry; views and triggers in the file
ran; a read-only reader opened the file ``immutable`` and answered from a stale file; ``@²``,
``@١`` and a 5,000-digit version gave raw errors or version 1.
"""

from __future__ import annotations

import copy
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

from mnist_peft.errors import EntryNotFoundError, InvalidNameError, ModelNotFoundError, RegistryError
from mnist_peft.io.adapters import save_adapter
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.names import parse_ref
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel

RESTORE = r"restore index\.db from a backup"


@pytest.fixture()
def adapter_dir(random_base, tmp_path: Path) -> Path:
    torch.manual_seed(1)
    model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    return save_adapter(model, tmp_path / "src-adapter", metadata={"digit": "7"})


@pytest.fixture()
def reg(tmp_path: Path, adapter_dir: Path) -> AdapterRegistry:
    """digit-7@1, digit-7@2, digit-9@1."""
    registry = AdapterRegistry(tmp_path / "reg")
    registry.add_many([("digit-7", adapter_dir, {}), ("digit-9", adapter_dir, {"digit": 9})])
    registry.add("digit-7", adapter_dir)
    return registry


def _sql(reg: AdapterRegistry, *statements: str) -> None:
    """Edit index.db as anyone with write access to the file could, then fold the log into it."""
    with sqlite3.connect(reg.root / "index.db", isolation_level=None) as c:
        for statement in statements:
            c.execute(statement)
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()


def _state(reg: AdapterRegistry) -> dict[str, object]:
    """The index's bytes and every file below the root (what a refused operation must leave as it was)."""
    files = {str(p.relative_to(reg.root)): p.read_bytes() for p in sorted(reg.root.rglob("*")) if p.is_file() and "index.db" not in p.name}
    files.pop(".index.lock", None)
    return {"index": (reg.root / "index.db").read_bytes(), "files": files}


def _refused_everywhere(reg: AdapterRegistry, adapter_dir: Path, match: str) -> None:
    """list, get, add and rm all refuse with ``match``, and change nothing; the CLI says it in one line."""
    before = _state(reg)
    for attempt in (reg.list, lambda: reg.get("digit-7"), lambda: reg.add("digit-7", adapter_dir), lambda: reg.remove("digit-9")):
        with pytest.raises(RegistryError, match=match):
            attempt()
    assert _state(reg) == before
    proc = run_cli("registry", "list", "--root", str(reg.root), timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: registry index") and "entries in" not in proc.stdout, proc
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ----------------------------------------------------------------------------- an index mistaken for an empty one
def test_a_zero_byte_index_next_to_entry_folders_is_an_error_and_add_forgets_nothing(reg: AdapterRegistry, adapter_dir: Path) -> None:
    (reg.root / "index.db").write_bytes(b"")
    _refused_everywhere(reg, adapter_dir, rf"has no tables: it is empty, or its tables were dropped.*{RESTORE}")
    assert sorted(p.name for p in (reg.root / "digit-7").iterdir()) == ["v1", "v2"]


@pytest.mark.parametrize(
    ("drop", "problem"),
    [
        (["DROP TABLE entries", "DROP TABLE high_water", "DROP TABLE meta"], "has no tables"),
        (["DROP TABLE entries"], "table 'entries' is missing"),
        (["DROP TABLE high_water"], "table 'high_water' is missing"),
    ],
)
def test_an_index_whose_tables_were_dropped_is_an_error_not_an_empty_registry(
    reg: AdapterRegistry, adapter_dir: Path, drop: list[str], problem: str
) -> None:
    _sql(reg, *drop)
    _refused_everywhere(reg, adapter_dir, rf"{problem}.*{RESTORE}")


def test_a_missing_index_next_to_entry_folders_is_an_error_not_a_new_registry(reg: AdapterRegistry, adapter_dir: Path) -> None:
    for f in reg.root.glob("index.db*"):
        f.unlink()
    for attempt in (reg.list, lambda: reg.add("digit-7", adapter_dir)):
        with pytest.raises(
            RegistryError, match=rf"index\.db' is missing, but .* holds entry folders \(digit-7/v1, digit-7/v2, digit-9/v1\).*{RESTORE}"
        ):
            attempt()
    assert not (reg.root / "index.db").exists() and not (reg.root / "digit-7" / "v3").exists()


@pytest.mark.parametrize("content", [b"", b"{}"])
def test_an_empty_index_json_next_to_entry_folders_is_an_error(reg: AdapterRegistry, adapter_dir: Path, content: bytes) -> None:
    """The JSON store (a registry made before index.db) already refused these; kept so it stays so."""
    reg.export_index()
    for f in reg.root.glob("index.db*"):
        f.unlink()
    (reg.root / "index.json").write_bytes(content)
    for attempt in (reg.list, lambda: reg.add("digit-7", adapter_dir)):
        with pytest.raises(RegistryError, match=r"unreadable|no 'entries' list"):
            attempt()
    assert (reg.root / "index.json").read_bytes() == content and not (reg.root / "index.db").exists()


def test_a_removed_version_is_never_reused_even_when_the_index_lost_its_mark(reg: AdapterRegistry, adapter_dir: Path) -> None:
    """The folders on disk count as used versions: next = max(index mark, highest v<N> folder) + 1."""
    reg.add("digit-7", adapter_dir)  # digit-7@3
    reg.remove("digit-7@2")
    store = reg.store
    document = store.dump()  # the index loses its marks and all but digit-7@1 (digit-7/v3 stays on disk)
    document.update(entries=[e for e in document["entries"] if (e["name"], e["version"]) != ("digit-7", 3)], high_water={})
    store.load(document)
    assert reg.add("digit-7", adapter_dir).version == 4  # never 2 (removed) or 3 (on disk)


# ----------------------------------------------------------------------------- nothing stored in the file runs
def test_a_view_faking_entries_is_refused_unread(reg: AdapterRegistry, adapter_dir: Path) -> None:
    fake = dict(reg.get("digit-9@1").to_dict(), name="digit-3", path="digit-3/v1")
    _sql(reg, "DROP TABLE entries", f"CREATE VIEW entries AS SELECT 'digit-3' AS name, 1 AS version, '{json.dumps(fake)}' AS body")
    _refused_everywhere(reg, adapter_dir, rf"holds view 'entries', which mnist-peft never writes.*{RESTORE}")


def test_a_view_over_an_endless_recursive_query_does_not_hang_registry_list(reg: AdapterRegistry) -> None:
    """The old reader selected from whatever ``entries`` was: this view never finishes (constant
    memory, so the old code hangs rather than exhausting the machine)."""
    _sql(
        reg,
        "DROP TABLE entries",
        "CREATE VIEW entries AS WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r) "
        "SELECT 'digit-3' AS name, i AS version, '{}' AS body FROM r WHERE i < 0",
    )
    proc = run_cli("registry", "list", "--root", str(reg.root), timeout=60)  # the old code: TimeoutExpired
    assert proc.returncode == 1 and "holds view 'entries'" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("statement", "problem"),
    [
        ("CREATE TRIGGER t AFTER INSERT ON entries BEGIN DELETE FROM entries WHERE name = 'digit-9'; END", "holds trigger 't'"),
        ("CREATE INDEX extra ON entries(body)", "holds index 'extra'"),
        ("CREATE TABLE extra (x)", "holds table 'extra'"),
        ("ALTER TABLE entries ADD COLUMN x TEXT", "table 'entries' is not the one mnist-peft writes"),
        ("DELETE FROM meta", r"format row\(s\) \[\]"),
        ("UPDATE meta SET value = '99'", r"format row\(s\) \[\('format', '99'\)\].*another version of mnist-peft"),
    ],
)
def test_a_schema_other_than_ours_is_refused_before_anything_runs(
    reg: AdapterRegistry, adapter_dir: Path, statement: str, problem: str
) -> None:
    """A trigger fired on every add (here deleting digit-9 from the index); an extra index, table or
    column, or a format row of another version, is as foreign. None of it is read or written."""
    _sql(reg, statement)
    _refused_everywhere(reg, adapter_dir, problem)


def test_every_connection_turns_trusted_schema_off_before_anything_else(reg: AdapterRegistry, adapter_dir: Path, monkeypatch) -> None:
    statements: list[list[str]] = []
    real_connect = sqlite3.connect

    class Recording(sqlite3.Connection):
        def execute(self, sql, *args):
            self.seen.append(sql)
            return super().execute(sql, *args)

    def connect(target, *args, **kwargs):
        c = real_connect(target, *args, factory=Recording, **kwargs)
        c.seen = []
        statements.append(c.seen)
        return c

    monkeypatch.setattr(sqlite3, "connect", connect)
    reg.list()
    reg.add("digit-7", adapter_dir)
    reg.remove("digit-9")
    AdapterRegistry(reg.root.parent / "fresh").add("digit-7", adapter_dir)  # one that makes its index.db
    assert len(statements) >= 6 and all(seen and seen[0] == "PRAGMA trusted_schema=OFF" for seen in statements), statements


def test_the_index_records_its_format_and_an_older_index_gets_it_on_its_next_write(reg: AdapterRegistry, adapter_dir: Path) -> None:
    def meta() -> list[tuple]:
        with sqlite3.connect(reg.root / "index.db") as c:
            rows = c.execute("SELECT name FROM sqlite_master WHERE name = 'meta'").fetchall() and c.execute("SELECT * FROM meta").fetchall()
        c.close()
        return rows

    assert meta() == [("format", "1")]
    _sql(reg, "DROP TABLE meta")  # exactly what index.db was before the format row
    before = (reg.root / "index.db").read_bytes()
    assert [e.ref for e in reg.list()] == ["digit-7@1", "digit-7@2", "digit-9@1"] and meta() == []
    assert (reg.root / "index.db").read_bytes() == before  # a read writes nothing
    assert reg.add("digit-7", adapter_dir).version == 3 and meta() == [("format", "1")]


# ----------------------------------------------------------------------------- reading while another process writes
WRITER = """
import sqlite3, sys, time
from pathlib import Path
from mnist_peft.registry.adapter_registry import AdapterRegistry

root, src, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
holder = sqlite3.connect(root / "index.db")  # another process with the registry open (a web app, a `registry list`):
holder.execute("SELECT count(*) FROM sqlite_master").fetchall()  # commits then stay in index.db-wal, not in the file
reg = AdapterRegistry(root)
for i in range(n):
    reg.add("digit-7", src)
    print(i + 1, flush=True)
    time.sleep(0.02)
"""


def test_a_read_only_reader_sees_every_commit_of_a_concurrent_writer(tmp_path: Path, adapter_dir: Path, monkeypatch) -> None:
    """A reader that cannot write the folder (``os.access`` says so: tests run as root) lists while
    another process adds 25 versions: every list is a whole prefix of what was written (never torn),
    holds at least every add the writer had finished when the list began (never stale), and never
    errors. The old reader opened the file ``immutable`` and refused the writer's log outright."""
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    n = 25
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(reg.root), str(adapter_dir), str(n)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    done = [0]

    def follow() -> None:
        for line in proc.stdout:
            done[0] = int(line)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if Path(p) == reg.root and mode == os.W_OK else real_access(p, mode, **kw)
    )
    seen: set[int] = set()
    try:
        while True:
            finished, before = proc.poll() is not None, done[0]
            refs = [e.ref for e in reg.list()]
            assert refs == [f"digit-7@{v}" for v in range(1, len(refs) + 1)], refs  # whole commits only
            assert len(refs) >= 1 + before, (len(refs), before)  # nothing the writer finished is missing
            assert reg.get("digit-7").version >= 1 + before
            seen.add(len(refs))
            if finished:
                break
            time.sleep(0.005)
    finally:
        proc.wait(timeout=120)
        follower.join(timeout=10)
    assert proc.returncode == 0 and done[0] == n and max(seen) == n + 1
    assert len(seen) > 3, seen  # the reads did interleave with the writes


# ----------------------------------------------------------------------------- versions: ASCII digits, bounded
@pytest.mark.parametrize("version", ["²", "١", "𝟏", "1" * 5000, "0", "", "+1", " 1", "1_0", "10000000001", "1\n"])
def test_a_version_is_ascii_digits_with_a_bound_and_a_one_line_error(version: str) -> None:
    ref = f"digit-9@{version}"
    with pytest.raises(InvalidNameError) as caught:
        parse_ref(ref)
    message = str(caught.value)
    assert "invalid version" in message and "ASCII digits" in message and "1,000,000,000" in message
    assert "\n" not in message and len(message) < 300, message


def test_version_errors_read_the_same_through_the_registry_and_the_cli(reg: AdapterRegistry) -> None:
    from mnist_peft.registry.refs import resolve_adapter

    for attempt in (lambda: reg.get("digit-7@١"), lambda: reg.remove("digit-7@²"), lambda: resolve_adapter("digit-7@𝟏", reg)):
        with pytest.raises(InvalidNameError, match="ASCII digits"):
            attempt()
    assert [e.ref for e in reg.list()] == ["digit-7@1", "digit-7@2", "digit-9@1"]  # @١ never removed version 1
    proc = run_cli("registry", "show", "digit-7@" + "9" * 5000, "--root", str(reg.root))
    assert proc.returncode == 1 and proc.stderr.startswith("error: invalid version") and len(proc.stderr) < 400, proc.stderr


def test_version_folders_on_disk_are_read_with_the_same_rule(reg: AdapterRegistry, adapter_dir: Path) -> None:
    """Only ``v`` + ASCII digits counts as a version folder: 'v٣' or a 12-digit one is a stray folder."""
    for stray in ("v٣", "v" + "9" * 12, "vx"):
        (reg.root / "digit-7" / stray).mkdir()
    assert reg.add("digit-7", adapter_dir).version == 3


# ----------------------------------------------------------------------------- an unknown name
def test_an_unknown_name_lists_a_few_of_the_names_there_are_and_the_closest(tmp_path: Path, adapter_dir: Path) -> None:
    from mnist_peft.registry.refs import resolve_adapter

    reg = AdapterRegistry(tmp_path / "reg")
    reg.add_many([(f"digit-{d}", adapter_dir, {"digit": d}) for d in range(10)])
    with pytest.raises(
        EntryNotFoundError, match=r"entries: digit-0, digit-1, digit-2, digit-3, digit-4 and 5 more \(did you mean 'digit-9'"
    ):
        reg.get("digit9")
    with pytest.raises(ModelNotFoundError, match=r"neither a folder nor an entry .*and 5 more \(did you mean 'digit-9'"):
        resolve_adapter("digit9@1", reg)
    with pytest.raises(EntryNotFoundError, match=r"and 5 more; see `mnist-peft registry list`"):  # nothing close: no guess
        reg.get("base")
    empty = AdapterRegistry(tmp_path / "empty")
    empty.root.mkdir()
    with pytest.raises(EntryNotFoundError, match="has no entries yet"):
        empty.get("digit-9")


def test_a_snapshot_torn_by_a_checkpoint_is_read_again_not_called_corrupt(tmp_path: Path, monkeypatch) -> None:
    """A reader that cannot write the folder reads a quiet index as an immutable snapshot; a writer's
    checkpoint during that read can make SQLite see a malformed file. That is a changed file, not a
    corrupt one: the read is done again (an unchanged file that fails to read is still an error)."""
    import sqlite3

    from mnist_peft.registry.stores import sqlite as sqlite_store
    from mnist_peft.registry.stores.sqlite import SqliteIndex

    index = SqliteIndex(tmp_path / "index.db")
    index.create()
    index.write(add=[{"name": "d", "version": 1, "kind": "lora", "files": {}}], marks={"d": 1})
    real_access, real_connect = os.access, sqlite3.connect
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path and mode == os.W_OK else real_access(p, mode, **kw)
    )
    torn = {"left": 1}

    def connect(target, *a, **kw):
        if "immutable=1" in str(target) and torn["left"]:
            torn["left"] -= 1
            raise sqlite3.DatabaseError("database disk image is malformed")  # what a torn snapshot reads as
        return real_connect(target, *a, **kw)

    monkeypatch.setattr(sqlite3, "connect", connect)
    signatures = iter([(1,), (2,), (2,), (2,)])  # the file changed during the first try
    monkeypatch.setattr(sqlite_store, "_quiet_signature", lambda path: next(signatures))
    assert [e["version"] for e in index.entries()] == [1]

    torn["left"] = 1
    monkeypatch.setattr(sqlite_store, "_quiet_signature", lambda path: (3,))  # nothing changed: really unreadable
    with pytest.raises(RegistryError, match="malformed"):
        index.entries()


def test_a_pulled_version_far_ahead_does_not_spend_the_names_numbers(tmp_path: Path, adapter_dir: Path) -> None:
    """A pull keeps the remote version number where it is free; a hostile remote's 1,000,000,000
    would leave the name no number for its next add, so a number that far ahead is not kept."""
    reg = AdapterRegistry(tmp_path / "fresh")
    kept = reg.add_many([("digit-9", adapter_dir, {"version": 5})])[0]
    assert kept.version == 5  # free and near: kept
    far = reg.add_many([("digit-9", adapter_dir, {"version": 1_000_000_000})])[0]
    assert far.version == 6  # far ahead: the next one
    assert reg.add("digit-9", adapter_dir).version == 7

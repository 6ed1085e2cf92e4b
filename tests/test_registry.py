"""The adapter registry: versions, integrity, names, locking, crash safety, CLI."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

from mnist_peft.errors import EntryNotFoundError, IntegrityError, InvalidNameError, ModelNotFoundError, RegistryError
from mnist_peft.io.adapters import save_adapter
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.names import parse_ref
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel


@pytest.fixture()
def adapter_dir(random_base, tmp_path: Path) -> Path:
    torch.manual_seed(1)
    model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    return save_adapter(model, tmp_path / "src-adapter", metadata={"digit": "7"})


@pytest.fixture()
def base_dir(random_base, tmp_path: Path) -> Path:
    random_base.save_pretrained(tmp_path / "src-base")
    return tmp_path / "src-base"


def test_add_get_versions_and_metadata(tmp_path: Path, adapter_dir: Path, base_dir: Path, random_base) -> None:
    from mnist_peft.model.mlp import base_fingerprint

    reg = AdapterRegistry(tmp_path / "reg")
    base = reg.add("base", base_dir)
    v1 = reg.add("digit-7", adapter_dir, metrics={"accuracy": 0.9})
    v2 = reg.add("digit-7", adapter_dir)
    assert (base.kind, v1.kind, v1.version, v2.version) == ("base", "lora", 1, 2)
    assert v1.digit == 7 and v1.r == 2 and v1.lora_alpha == 4 and v1.metrics == {"accuracy": 0.9}
    assert v1.base_fingerprint == base.base_fingerprint == base_fingerprint(random_base)
    assert set(v1.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert v1.files["adapter_model.safetensors"]["size"] == (adapter_dir / "adapter_model.safetensors").stat().st_size
    assert reg.get("digit-7").version == 2 and reg.get("digit-7@1").version == 1
    assert (reg.path("digit-7@1") / "adapter_config.json").read_bytes() == (adapter_dir / "adapter_config.json").read_bytes()
    assert [e.ref for e in reg.list()] == ["base@1", "digit-7@1", "digit-7@2"]
    from mnist_peft.fileio import current_umask

    umask = current_umask()  # atomic writes use temp files, but the result follows the umask like any file
    assert (reg.root / v1.path).stat().st_mode & 0o777 == 0o777 & ~umask
    assert (reg.root / v1.path / "adapter_config.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert reg.index_path.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(EntryNotFoundError, match="no version 3"):
        reg.get("digit-7@3")
    with pytest.raises(EntryNotFoundError, match="digit-8"):
        reg.get("digit-8")


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "Upper", "", ".hidden", "x..y", "-dash", "a b"])
def test_names_that_could_escape_or_are_invalid_are_refused(tmp_path: Path, adapter_dir: Path, name: str) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.raises(InvalidNameError):
        reg.add(name, adapter_dir)
    assert not (tmp_path / "evil").exists() and not reg.root.exists()  # a refused add creates nothing
    with pytest.raises(InvalidNameError):
        parse_ref("digit-9@0")


def test_truncated_or_bit_flipped_files_are_caught_by_verify_and_load(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    reg.add("other", adapter_dir)
    weights = reg.root / "digit-7/v1/adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit
    weights.write_bytes(bytes(data))
    cfg = reg.root / "other/v1/adapter_config.json"
    cfg.write_bytes(cfg.read_bytes()[:-10])  # truncated
    problems = dict(reg.verify())
    assert set(problems) == {"digit-7@1", "other@1"}
    assert "sha256" in problems["digit-7@1"] and "truncated" in problems["other@1"]
    with pytest.raises(IntegrityError) as err:
        reg.path("digit-7")
    assert err.value.path == weights


def test_remove_one_version_or_all(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    for _ in range(3):
        reg.add("digit-7", adapter_dir)
    assert [e.ref for e in reg.remove("digit-7@2")] == ["digit-7@2"]
    assert not (reg.root / "digit-7/v2").exists() and (reg.root / "digit-7/v3").exists()
    assert reg.add("digit-7", adapter_dir).version == 4  # numbers are never reused
    reg.remove("digit-7")
    assert reg.list() == [] and not (reg.root / "digit-7").exists()


def test_failed_add_changes_nothing(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    index = reg.index_path.read_bytes()
    with pytest.raises(RegistryError, match="neither an adapter folder"):
        reg.add_many([("good", adapter_dir, {}), ("bad", tmp_path, {})])
    assert reg.index_path.read_bytes() == index and not (reg.root / "good").exists()


_ADDER = """
import sys
from mnist_peft.registry.adapter_registry import AdapterRegistry
reg = AdapterRegistry(sys.argv[1])
for i in range(int(sys.argv[3])):
    reg.add(f"{sys.argv[2]}-{i}", sys.argv[4])
"""


def test_two_processes_adding_50_entries_each_end_with_100(tmp_path: Path, adapter_dir: Path) -> None:
    root = tmp_path / "reg"
    procs = [subprocess.Popen([sys.executable, "-c", _ADDER, str(root), who, "50", str(adapter_dir)], cwd=REPO) for who in ("a", "b")]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    reg = AdapterRegistry(root)
    assert len(reg.list()) == 100 and reg.verify() == []


_SLOW_ADDER = """
import sys, time, shutil
import mnist_peft.registry.adapter_registry as r
real = shutil.copyfile
def slow(src, dst, **kw):
    time.sleep(1.0)
    return real(src, dst, **kw)
shutil.copyfile = slow  # the shutil the registry's writes copy with
reg = r.AdapterRegistry(sys.argv[1])
print("ready", flush=True)
reg.add("victim", sys.argv[2])
"""


def test_writer_killed_mid_add_leaves_a_valid_index(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("keep", adapter_dir)
    before = reg.index_path.read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_ADDER, str(reg.root), str(adapter_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # inside the second (slowed) file copy, holding the lock
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert reg.index_path.read_bytes() == before
    assert [e.ref for e in reg.list()] == ["keep@1"] and reg.verify() == []
    assert reg.add("victim", adapter_dir).version == 1  # the lock was released with the process


def test_registry_cli_list_show_verify_rm(tmp_path: Path, adapter_dir: Path, base_dir: Path) -> None:
    root = str(tmp_path / "reg")
    assert run_cli("registry", "add", "base", str(base_dir), "--root", root).returncode == 0
    assert run_cli("registry", "add", "digit-7", str(adapter_dir), "--root", root).returncode == 0
    listed = json.loads(run_cli("registry", "list", "--root", root, "--json").stdout)
    assert [(e["name"], e["kind"]) for e in listed["entries"]] == [("base", "base"), ("digit-7", "lora")]
    shown = json.loads(run_cli("registry", "show", "digit-7", "--root", root, "--json").stdout)
    assert shown["versions"] == [1] and shown["digit"] == 7
    assert run_cli("registry", "verify", "--root", root).returncode == 0
    (tmp_path / "reg/digit-7/v1/adapter_model.safetensors").write_bytes(b"junk")
    bad = run_cli("registry", "verify", "--root", root)
    assert bad.returncode == 1 and "digit-7@1" in bad.stdout
    env = {"MNIST_PEFT_ADAPTERS": root}
    evaluated = run_cli("eval", "--base", "base", "--adapter", "digit-7", env=env)
    assert evaluated.returncode == 1 and "truncated" in evaluated.stderr and len(evaluated.stderr.strip().splitlines()) == 1
    assert run_cli("registry", "rm", "digit-7", env=env).returncode == 0
    missing = run_cli("eval", "--base", "base", "--adapter", "digit-7", env=env)
    assert missing.returncode == 1 and "registry" in missing.stderr


@pytest.mark.slow  # trains or runs a whole Hub round trip through the CLI: CI runs it, the developer loop skips it
def test_resume_through_the_registry_registers_version_2(tmp_path: Path, trained_base_dir: Path, data_root) -> None:
    root = str(tmp_path / "reg")
    assert run_cli("registry", "add", "base", str(trained_base_dir), "--root", root).returncode == 0
    first = run_cli("train-adapter", "--base", "base", "--digit", "3", "--register", "digit-3", "--steps", "20", "--root", root, "--json")
    assert first.returncode == 0, first.stderr
    second = run_cli("train-adapter", "--base", "base", "--digit", "3", "--resume", "digit-3", "--steps", "20", "--root", root, "--json")
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["registered"]["version"] == 2
    reg = AdapterRegistry(root)
    v1, v2 = reg.get("digit-3@1"), reg.get("digit-3@2")
    assert v1.files["adapter_model.safetensors"]["sha256"] != v2.files["adapter_model.safetensors"]["sha256"]
    assert reg.verify() == []


# ----------------------------------------------------------------------------- the index store
def test_the_index_lives_in_sqlite_and_exports_as_index_json(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir, metrics={"accuracy": 0.9})
    reg.add("digit-7", adapter_dir)
    reg.remove("digit-7@2")
    assert reg.index_path.name == "index.db" and not (reg.root / "index.json").exists()
    proc = run_cli("registry", "export", "--root", str(reg.root))
    assert proc.returncode == 0, proc.stderr
    document = json.loads((reg.root / "index.json").read_text())
    assert document["format"] == 1 and document["high_water"] == {"digit-7": 2}
    assert [e["path"] for e in document["entries"]] == ["digit-7/v1"] and document["entries"][0]["metrics"] == {"accuracy": 0.9}
    assert reg.index_path.name == "index.db"  # the export does not become the index
    assert reg.add("digit-7", adapter_dir).version == 3  # the mark survived rm, in the database


def _make_old_style(reg: AdapterRegistry) -> None:
    """Turn ``reg`` into a registry as earlier versions wrote it: index.json only (no export flag)."""
    document = json.loads(reg.export_index().read_text())
    del document["exported"]
    (reg.root / "index.json").write_text(json.dumps(document))
    for f in reg.root.glob("index.db*"):
        f.unlink()


def test_a_registry_made_before_index_db_moves_to_it_on_its_first_write(tmp_path: Path, adapter_dir: Path) -> None:
    """An index.json registry (as earlier versions wrote) is read as it is; the first write moves it."""
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    reg.add("digit-7", adapter_dir)
    reg.remove("digit-7@2")
    _make_old_style(reg)
    assert reg.index_path.name == "index.json" and [e.ref for e in reg.list()] == ["digit-7@1"]
    before = (reg.root / "index.json").read_bytes()
    assert reg.add("digit-8", adapter_dir).version == 1
    assert reg.index_path.name == "index.db" and (reg.root / "index.json.imported").read_bytes() == before
    assert [e.ref for e in reg.list()] == ["digit-7@1", "digit-8@1"]
    assert reg.add("digit-7", adapter_dir).version == 3  # its high-water mark came along


def test_a_tampered_database_row_is_a_clear_error(tmp_path: Path, adapter_dir: Path) -> None:
    import sqlite3

    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    with sqlite3.connect(reg.index_path) as c:  # a row whose body names another entry than its key
        c.execute("UPDATE entries SET body = replace(body, '\"digit-7\"', '\"digit-8\"')")
    with pytest.raises(RegistryError, match="names another entry"):
        reg.get("digit-7")
    with sqlite3.connect(reg.index_path) as c:
        c.execute("UPDATE entries SET body = '{not json'")
    with pytest.raises(RegistryError, match="unreadable"):
        reg.list()


def test_a_symlinked_write_ahead_log_is_refused(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    outside = tmp_path / "outside-wal"
    outside.write_bytes(b"")
    wal = reg.root / "index.db-wal"
    if wal.exists():
        wal.unlink()
    wal.symlink_to(outside)
    with pytest.raises(RegistryError, match="symlink"):
        reg.add("digit-8", adapter_dir)
    assert outside.read_bytes() == b""


def test_lookups_and_adds_read_only_the_names_they_touch(tmp_path: Path, adapter_dir: Path, monkeypatch) -> None:
    """What keeps the registry's cost flat at scale: get and add query one name, never the whole index."""
    from mnist_peft.registry.stores.sqlite import SqliteIndex

    reg = AdapterRegistry(tmp_path / "reg")
    for name in ("a", "b", "c"):
        reg.add(name, adapter_dir)
    asked: list[str | None] = []
    real = SqliteIndex.entries
    monkeypatch.setattr(SqliteIndex, "entries", lambda self, name=None: asked.append(name) or real(self, name))
    reg.get("b")
    reg.add("c", adapter_dir)
    reg.remove("a")
    assert asked and None not in asked, asked


def test_a_migration_stopped_midway_leaves_the_old_index_in_force(tmp_path: Path, adapter_dir: Path, monkeypatch) -> None:
    """The database is made aside and renamed in: a writer stopped while making it changes nothing."""
    from mnist_peft.registry.stores.sqlite import SqliteIndex

    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    reg.add("digit-7", adapter_dir)
    _make_old_style(reg)

    def interrupted(self, document):
        raise KeyboardInterrupt

    monkeypatch.setattr(SqliteIndex, "load", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reg.add("digit-8", adapter_dir)
    monkeypatch.undo()
    assert sorted(p.name for p in reg.root.glob("index*")) == ["index.json"]
    assert [e.ref for e in reg.list()] == ["digit-7@1", "digit-7@2"]
    assert reg.add("digit-7", adapter_dir).version == 3


def test_a_failed_rm_on_an_old_style_registry_changes_nothing(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    _make_old_style(reg)
    before = (reg.root / "index.json").read_bytes()
    with pytest.raises(EntryNotFoundError):
        reg.remove("nosuch")
    assert sorted(p.name for p in reg.root.glob("index*")) == ["index.json"] and (reg.root / "index.json").read_bytes() == before


def test_an_export_is_never_taken_for_the_index(tmp_path: Path, adapter_dir: Path) -> None:
    """With index.db gone, a (possibly stale) export is refused, not read as the index; an export
    into the registry's own files is refused; an index.db that is a folder is an error."""
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    with pytest.raises(RegistryError, match=r"only index\.json may be written"):
        reg.export_index(reg.root / "index.db")
    assert reg.get("digit-7").version == 1
    reg.export_index()
    (reg.root / "index.db").unlink()
    with pytest.raises(RegistryError, match="only an export"):
        reg.list()
    (reg.root / "index.db").mkdir()
    with pytest.raises(RegistryError, match="not a regular file"):
        reg.list()


def test_a_read_only_folder_is_read_with_sqlites_locks_or_a_checked_snapshot(tmp_path: Path, adapter_dir: Path, monkeypatch) -> None:
    """A folder the process may not write (a registry another user writes, a read-only mount).

    With no writer at work (no ``index.db-wal``), the file is read ``immutable`` (SQLite's ``mode=ro``
    cannot open a WAL database where it cannot make ``index.db-shm``) and the read is kept only if
    the file did not change meanwhile; a change makes it read again. With a writer at work, it is
    read ``mode=ro``, with SQLite's locks on, so the writer's commits are seen and its checkpoints
    never tear a read (``test_index_hardening`` runs a real concurrent writer). Where SQLite cannot
    read it that way, the read is refused with what to do, not answered from a stale file. (Tests
    run as root, so the folder's permission is what ``os.access`` says, and SQLite's answer on a
    read-only mount, measured as an unprivileged user, is replayed.)"""
    import sqlite3

    from mnist_peft.registry.stores import sqlite as sqlite_store

    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    reg.add("digit-7", adapter_dir)
    real_access, real_connect = os.access, sqlite3.connect
    opened: list[str] = []
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if Path(p) == reg.root and mode == os.W_OK else real_access(p, mode, **kw)
    )
    monkeypatch.setattr(sqlite3, "connect", lambda target, *a, **kw: opened.append(str(target)) or real_connect(target, *a, **kw))
    assert not (reg.root / "index.db-wal").exists()
    assert [e.ref for e in reg.list()] == ["digit-7@1", "digit-7@2"] and reg.get("digit-7").version == 2
    assert opened and all(t.startswith("file:") and t.endswith("?mode=ro&immutable=1") for t in opened), opened

    # The file changes under the snapshot (a writer's checkpoint): the read is not kept but done again.
    opened.clear()
    reg.list()
    reads = len(opened)
    calls = []
    monkeypatch.setattr(sqlite_store, "_quiet_signature", lambda path: calls.append(path) or ((1,) if len(calls) == 1 else (2,)))
    opened.clear()
    assert [e.ref for e in reg.list()] == ["digit-7@1", "digit-7@2"]
    assert len(opened) == reads + 1, opened  # the first read changed under it and was done again

    # A writer at work: SQLite's read-only mode with its locks, never a snapshot.
    monkeypatch.setattr(sqlite_store, "_quiet_signature", lambda path: None)
    opened.clear()
    assert reg.get("digit-7").version == 2
    assert opened and all(t.endswith("?mode=ro") for t in opened), opened

    def read_only_mount(target, *a, **kw):
        refused = sqlite3.OperationalError("attempt to write a readonly database")  # no index.db-shm can be made there
        refused.sqlite_errorname = "SQLITE_READONLY_DIRECTORY"
        raise refused

    monkeypatch.setattr(sqlite3, "connect", read_only_mount)
    with pytest.raises(RegistryError, match=r"cannot be read safely from a folder this user cannot write .* make the folder writable"):
        reg.list()


def test_a_missing_version_of_an_entry_names_the_versions_there_are(tmp_path: Path) -> None:
    from mnist_peft.registry.refs import resolve_adapter

    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-9", REPO / "adapters" / "digit-9" / "v1")
    assert resolve_adapter("digit-9@1", reg) == reg.path("digit-9@1")
    with pytest.raises(EntryNotFoundError, match=r"'digit-9' has no version 7; versions: \[1\]"):
        resolve_adapter("digit-9@7", reg)
    with pytest.raises(ModelNotFoundError, match="neither a folder nor an entry"):  # an unknown name is still that
        resolve_adapter("digit-8@1", reg)

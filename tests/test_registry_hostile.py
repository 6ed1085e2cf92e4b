"""The registry and the Hub sync pointed at hostile input: a stranger's repo, an edited index,
symlinks, folders it does not own, concurrent pushers and a server that echoes the token."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from hub_server import HubServer

from mnist_peft.errors import IntegrityError, InvalidNameError, RegistryError
from mnist_peft.io.adapters import save_adapter
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.names import confine
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel


def _edit_index(reg: AdapterRegistry, change) -> None:
    """Tamper with the index as someone with write access to it would: the raw document, unchecked."""
    store = reg.store
    document = store.dump()
    change(document)
    store.load(document)


@pytest.fixture()
def adapter_dir(random_base, tmp_path: Path) -> Path:
    torch.manual_seed(1)
    model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    return save_adapter(model, tmp_path / "src-adapter", metadata={"digit": "7"})


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (links not followed) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


# ----------------------------------------------------------------------------- confinement
@pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a\\b", "", "a/\0"])
def test_confine_refuses_paths_that_leave_the_root(tmp_path: Path, rel: str) -> None:
    with pytest.raises(RegistryError):
        confine(tmp_path, rel)


def test_confine_refuses_a_symlink_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(RegistryError, match="symlink"):
        confine(tmp_path / "root", "link/file")
    assert confine(tmp_path / "root", "plain/file") == tmp_path / "root" / "plain" / "file"


# ----------------------------------------------------------------------------- a tampered local index
@pytest.mark.parametrize("bad_path", ["../victim", "/tmp/victim-abs", "digit-7/v2"])
def test_an_index_path_outside_its_entry_is_refused_by_verify_rm_and_push(tmp_path: Path, adapter_dir: Path, bad_path: str) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    _edit_index(reg, lambda data: data["entries"][0].update(path=bad_path if not bad_path.startswith("/") else str(victim)))
    before = _snapshot(tmp_path)
    for args in (["registry", "verify"], ["registry", "rm", "digit-7"], ["registry", "list"], ["push", "--repo-id", "team/x"]):
        proc = run_cli(*args, "--root", str(reg.root), env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"})
        assert proc.returncode == 1 and "path" in proc.stderr and "restore" in proc.stderr, (args, proc.stderr)
    assert _snapshot(tmp_path) == before  # nothing deleted, nothing written, inside or out


@pytest.mark.parametrize(
    ("field", "value"),
    [("digit", {"x": 1}), ("version", "1"), ("kind", "exe"), ("files", {"../x": {"sha256": "0" * 64, "size": 1}}), ("name", "../up")],
)
def test_fields_of_the_wrong_type_give_a_clear_error_not_a_crash(tmp_path: Path, adapter_dir: Path, field: str, value: object) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    _edit_index(reg, lambda data: data["entries"][0].update({field: value}))
    proc = run_cli("registry", "list", "--root", str(reg.root))
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ----------------------------------------------------------------------------- symlinks in the root
def test_symlinked_entry_folders_are_refused_by_add_rm_verify_and_push(tmp_path: Path, adapter_dir: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    # An entry folder replaced by a link (git carries symlinks): its files now live outside.
    real = reg.root / "digit-7" / "v1"
    for f in real.iterdir():
        (outside / f.name).write_bytes(f.read_bytes())
    for f in real.iterdir():
        f.unlink()
    real.rmdir()
    real.symlink_to(outside)
    before = _snapshot(outside)
    assert [ref for ref, _ in reg.verify()] == ["digit-7@1"] and "symlink" in reg.verify()[0][1]
    with pytest.raises(RegistryError, match="symlink"):
        reg.remove("digit-7")
    with pytest.raises(IntegrityError, match="symlink"):
        reg.path("digit-7")
    proc = run_cli("push", "--repo-id", "team/x", "--root", str(reg.root), env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert proc.returncode == 1 and "symlink" in proc.stderr
    # A name folder that is a link: add refuses to write through it.
    (reg.root / "other").symlink_to(outside)
    with pytest.raises(RegistryError, match="symlink"):
        reg.add("other", adapter_dir)
    assert _snapshot(outside) == before and reg.get("digit-7").version == 1


# ----------------------------------------------------------------------------- what add may delete
def test_add_never_deletes_a_folder_the_index_does_not_list(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    mine = reg.root / "digit-7" / "v2"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's own file")
    entry = reg.add("digit-7", adapter_dir)
    assert entry.version == 3 and (mine / "notes.txt").read_text() == "a user's own file"
    # After a lost index ("entries": {}), the folders on disk are not overwritten either.
    _edit_index(reg, lambda data: data.update(entries=[], high_water={}))
    again = reg.add("digit-7", adapter_dir)
    assert again.version == 4 and (reg.root / "digit-7" / "v1").is_dir() and (mine / "notes.txt").exists()


def test_versions_are_never_reused_after_rm(tmp_path: Path, adapter_dir: Path, random_base) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    v2 = reg.add("digit-7", adapter_dir)
    old_sha = v2.files["adapter_model.safetensors"]["sha256"]
    reg.remove("digit-7@2")
    torch.manual_seed(5)
    other = save_adapter(LoraModel(copy.deepcopy(random_base), LoraConfig(r=2, init_lora_weights=False)), tmp_path / "other")
    v3 = reg.add("digit-7", other)
    assert v3.version == 3  # digit-7@2 never names different bytes
    with pytest.raises(Exception, match="no version 2"):
        reg.get("digit-7@2")
    assert v3.files["adapter_model.safetensors"]["sha256"] != old_sha
    reg.remove("digit-7")
    assert reg.add("digit-7", adapter_dir).version == 4


def test_reserved_names_and_a_missing_root(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.raises(InvalidNameError, match="reserved"):
        reg.add("index.json", adapter_dir)
    proc = run_cli("registry", "verify", "--root", str(tmp_path / "typo"))
    assert proc.returncode == 1 and "no registry at" in proc.stderr
    assert not (tmp_path / "typo").exists()


def test_staging_leftovers_of_killed_writers_are_cleaned_on_the_next_write(tmp_path: Path, adapter_dir: Path) -> None:
    from mnist_peft.registry.writes import STAGING_MARKER

    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    leftover = reg.root / ".staging" / "add-killed"  # what a writer killed mid-copy leaves: its marker is still inside
    leftover.mkdir()
    (leftover / STAGING_MARKER).touch()
    (leftover / "adapter_model.safetensors").write_bytes(b"x" * 1000)
    users = reg.root / ".staging" / "add-notes"  # the user's own folder with that prefix: not ours
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / STAGING_MARKER).touch()
    (outside / "keep.txt").write_text("keep")
    (reg.root / ".staging" / "add-link").symlink_to(outside)
    reg.add("digit-8", adapter_dir)
    assert not leftover.exists()
    assert (users / "notes.txt").read_text() == "mine" and (reg.root / ".staging" / "add-link").is_symlink()
    assert (outside / "keep.txt").read_text() == "keep"


# ----------------------------------------------------------------------------- a hostile Hub repo
@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    server = HubServer.start(tmp_path_factory.mktemp("hub"))
    yield server
    server.stop()


def _publish(hub: HubServer, repo_id: str, files: dict[str, bytes]) -> None:
    """Put files straight into a repo on the test Hub, as a stranger could."""
    hub.create_repo(repo_id)
    lines = [{"key": "header", "value": {"summary": "hostile"}}]
    lines += [
        {"key": "file", "value": {"path": p, "content": base64.b64encode(b).decode(), "encoding": "base64"}} for p, b in files.items()
    ]
    hub.commit(repo_id, lines)


def _hostile_index(adapter_dir: Path, **override: object) -> tuple[dict[str, bytes], dict]:
    files = {f.name: f.read_bytes() for f in adapter_dir.iterdir() if f.is_file()}
    entry = {
        "name": "digit-7",
        "version": 1,
        "kind": "lora",
        "path": "digit-7",
        "digit": 7,
        "r": 2,
        "lora_alpha": 4,
        "base_fingerprint": None,
        "created": "",
        "metrics": {},
        "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in files.items()},
    }
    entry.update(override)
    repo_files = {f"digit-7/{n}": b for n, b in files.items()}
    return repo_files, {"format": 1, "entries": [entry]}


@pytest.mark.parametrize(
    "attack",
    ["file_name_traversal", "path_traversal", "absolute_path", "digit_object", "sha_mismatch", "deep_traversal_name"],
)
def test_a_hostile_remote_index_writes_nothing_anywhere(hub: HubServer, tmp_path: Path, adapter_dir: Path, attack: str) -> None:
    target = tmp_path / "home" / ".bashrc"
    target.parent.mkdir()
    target.write_text("# the user's shell startup file\n")
    sha = hashlib.sha256(b"echo pwned\n").hexdigest()
    evil_files = {
        n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in ((f.name, f.read_bytes()) for f in adapter_dir.iterdir())
    }
    overrides = {
        "file_name_traversal": {"files": {**evil_files, "../" * 20 + str(target).lstrip("/"): {"sha256": sha, "size": 11}}},
        "path_traversal": {"path": "../../home"},
        "absolute_path": {"path": str(target.parent)},
        "digit_object": {"digit": {"x": 1}},
        "sha_mismatch": {"files": {**evil_files, "adapter_model.safetensors": {"sha256": "0" * 64, "size": 5}}},
        "deep_traversal_name": {"name": "../../home"},
    }[attack]
    repo_files, index = _hostile_index(adapter_dir, **overrides)
    repo_id = f"stranger/{attack.replace('_', '-')}"
    _publish(hub, repo_id, {**repo_files, "index.json": json.dumps(index).encode(), "home/.bashrc": b"echo pwned\n"})
    root = tmp_path / "reg"
    AdapterRegistry(root).add("mine", adapter_dir)
    before_root, before_home = _snapshot(root), _snapshot(target.parent)
    proc = run_cli("pull", "--repo-id", repo_id, "--root", str(root), env=hub.env(tmp_path / "hf-home"))
    assert proc.returncode == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert _snapshot(target.parent) == before_home and _snapshot(root) == before_root
    assert [e.ref for e in AdapterRegistry(root).list()] == ["mine@1"]


def test_pulled_entries_record_where_they_came_from(hub: HubServer, tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    env = hub.env(tmp_path / "hf-home")
    assert run_cli("push", "--repo-id", "team/source", "--root", str(reg.root), env=env).returncode == 0
    pulled = AdapterRegistry(tmp_path / "pulled")
    assert run_cli("pull", "--repo-id", "team/source", "--root", str(pulled.root), env=env).returncode == 0
    source = pulled.get("digit-7").source
    assert source == {"repo_id": "team/source", "revision": hub.head("team/source")}
    refused = run_cli("pull", "--repo-id", "team/source", "--root", str(pulled.root), "--name", "digit-7@2", env=env)
    assert refused.returncode == 1 and "--revision" in refused.stderr


# ----------------------------------------------------------------------------- concurrent pushers
def test_four_concurrent_pushers_of_different_entries_all_land(hub: HubServer, tmp_path: Path, random_base) -> None:
    roots = []
    for i in range(4):
        torch.manual_seed(100 + i)
        model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=2, init_lora_weights=False))
        reg = AdapterRegistry(tmp_path / f"reg{i}")
        reg.add(f"tenant-{i}", save_adapter(model, tmp_path / f"src{i}"))
        roots.append(reg.root)
    env = hub.env(tmp_path / "hf-home")
    hub.create_repo("team/shared")
    results: list = [None] * 4

    def push(i: int) -> None:
        results[i] = run_cli("push", "--repo-id", "team/shared", "--root", str(roots[i]), env=env)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    index = json.loads((hub.repo_path("team/shared") / "index.json").read_text())
    assert sorted(e["name"] for e in index["entries"]) == [f"tenant-{i}" for i in range(4)]


def test_the_test_hub_refuses_a_commit_on_a_stale_parent(hub: HubServer) -> None:
    from hub_server import StaleParentError

    hub.create_repo("team/stale")
    parent = hub.head("team/stale")
    hub.commit("team/stale", [{"key": "header", "value": {"summary": "one", "parentCommit": parent}}])
    with pytest.raises(StaleParentError):
        hub.commit("team/stale", [{"key": "header", "value": {"summary": "two", "parentCommit": parent}}])


# ----------------------------------------------------------------------------- errors by kind, no token
TOKEN = "hf_SENTINELtokenDoNotPrint1234567890"


class _Echo(BaseHTTPRequestHandler):
    """Answers every request with one status and the request's Authorization header in the body."""

    status = 500
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        body = json.dumps({"error": f"echo: {self.headers.get('Authorization')}"}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_PUT = _answer


@pytest.mark.parametrize(
    ("status", "words"), [(401, "HF_TOKEN"), (403, "HF_TOKEN"), (404, "not found"), (500, "server error"), (503, "server error")]
)
def test_hub_errors_name_their_kind_and_never_print_the_token(tmp_path: Path, adapter_dir: Path, status: int, words: str) -> None:
    handler = type("Echo", (_Echo,), {"status": status})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reg = AdapterRegistry(tmp_path / "reg")
        reg.add("digit-7", adapter_dir)
        env = {
            "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
            "HF_TOKEN": TOKEN,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_ETAG_TIMEOUT": "2",
            "HF_HUB_DOWNLOAD_TIMEOUT": "2",
        }
        for args in (
            ["push", "--repo-id", "team/x", "--root", str(reg.root)],
            ["pull", "--repo-id", "team/x", "--root", str(tmp_path / "new")],
        ):
            proc = run_cli(*args, env=env, timeout=120)
            out = proc.stdout + proc.stderr
            assert proc.returncode == 1 and TOKEN not in out and TOKEN[:12] not in out, out
            assert len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr
    finally:
        server.shutdown()
    assert os.environ.get("HF_TOKEN") != TOKEN


def test_a_folder_named_like_an_entry_does_not_shadow_it_silently(tmp_path: Path, adapter_dir: Path, random_base) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    random_base.save_pretrained(tmp_path / "base-src")
    reg.add("base", tmp_path / "base-src")
    reg.add("digit-7", adapter_dir)
    work = tmp_path / "work"
    (work / "digit-7").mkdir(parents=True)
    proc = run_cli("eval", "--base", "base", "--adapter", "digit-7", "--root", str(reg.root), cwd=work)
    assert proc.returncode == 1 and "both a folder here and an entry" in proc.stderr and "./digit-7" in proc.stderr


def test_a_registry_written_before_high_water_marks_still_never_reuses_a_version(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    reg.add("digit-7", adapter_dir)
    _edit_index(reg, lambda data: data.pop("high_water"))  # as an index from before this field existed
    reg.remove("digit-7@2")
    assert reg.add("digit-7", adapter_dir).version == 3


def test_a_writer_on_a_missing_root_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no registry at"):
        AdapterRegistry(tmp_path / "typo").remove("digit-7")
    assert not (tmp_path / "typo").exists()


@pytest.mark.parametrize("payload", ['{"entries": [{"version": 1' + "0" * 5000 + "}]}", "[" * 100000 + "]" * 100000])
def test_absurd_index_content_is_a_registry_error(tmp_path: Path, adapter_dir: Path, payload: str) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    reg.index_path.write_text(payload)
    with pytest.raises(RegistryError, match="unreadable"):
        reg.list()


def test_a_huge_version_number_is_refused_not_an_os_error(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    _edit_index(reg, lambda data: data["entries"][0].update(version=10**300, path=f"digit-7/v{10**300}"))
    with pytest.raises(RegistryError, match="version must be an integer"):
        reg.verify()


def test_symlinks_inside_a_source_folder_are_not_copied(tmp_path: Path, adapter_dir: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("PRIVATE KEY")
    (adapter_dir / "README.md").unlink()
    (adapter_dir / "README.md").symlink_to(secret)
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="symlink"):
        reg.add("digit-7", adapter_dir)
    assert not (reg.root / "digit-7").exists()


def test_a_symlinked_index_is_refused(tmp_path: Path, adapter_dir: Path) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    elsewhere = tmp_path / "elsewhere.db"
    elsewhere.write_bytes(reg.index_path.read_bytes())
    reg.index_path.unlink()
    reg.index_path.symlink_to(elsewhere)
    with pytest.raises(RegistryError, match="symlink"):
        reg.list()


def test_remove_does_not_follow_a_link_swapped_in_after_its_checks(tmp_path: Path, adapter_dir: Path, monkeypatch) -> None:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    victim = tmp_path / "victim"
    (victim / "v1").mkdir(parents=True)
    (victim / "v1" / "precious.txt").write_text("keep")
    from mnist_peft.registry.stores.sqlite import SqliteIndex

    real_write = SqliteIndex.write

    def swap_then_write(self, **changes):  # the race: between the checks and the deletion
        real_write(self, **changes)
        for f in (reg.root / "digit-7" / "v1").iterdir():
            f.unlink()
        (reg.root / "digit-7" / "v1").rmdir()
        (reg.root / "digit-7").rmdir()
        (reg.root / "digit-7").symlink_to(victim)

    monkeypatch.setattr(SqliteIndex, "write", swap_then_write)
    with pytest.raises(RegistryError, match="symlink"):
        reg.remove("digit-7")
    assert (victim / "v1" / "precious.txt").read_text() == "keep"


def test_loading_a_base_from_a_hub_that_echoes_the_token_never_prints_it(tmp_path: Path) -> None:
    handler = type("Echo", (_Echo,), {"status": 401})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = {
            "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
            "HF_TOKEN": TOKEN,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_XET": "1",
        }
        proc = run_cli("eval", "--base", "team/base", "--root", str(tmp_path), env=env, timeout=120)
    finally:
        server.shutdown()
    assert proc.returncode == 1 and TOKEN[:12] not in proc.stdout + proc.stderr and "HF_TOKEN" in proc.stderr, proc.stderr

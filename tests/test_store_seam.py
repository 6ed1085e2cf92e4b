"""The registry's store seam: ``AdapterRegistry(root, store=...)`` takes any ``IndexStore``.

A toy store written here (a dict and high-water marks in memory, nothing on disk) runs the same
add / get / rm / verify / never-reuse-a-version behaviours as the default ``index.db``; the
registry does not change. The adapters' files are real, in ``tmp_path``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from mnist_peft import LoraConfig, LoraModel, save_adapter
from mnist_peft.errors import EntryNotFoundError, IntegrityError, RegistryError
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.stores.base import IndexStore


class MemoryIndex:
    """An :class:`IndexStore` in a dict: raw entries by (name, version), marks by name.

    Like any store it keeps raw JSON objects and never interprets them (the registry validates
    what it reads); ``create`` makes the index, so a fresh store holds none, as an empty folder does.
    """

    def __init__(self) -> None:
        self.path = Path(":memory:")
        self.rows: dict[tuple[str, int], dict[str, object]] | None = None  # None: no index yet
        self.high: dict[str, int] = {}
        self.calls: list[str] = []

    def exists(self) -> bool:
        return self.rows is not None

    def writable(self) -> bool:
        return self.exists()

    def create(self, document: dict[str, object] | None = None) -> None:
        self.calls.append("create")
        self.rows = {}
        self.load(document or {"format": 1, "entries": [], "high_water": {}})

    def entries(self, name: str | None = None) -> list[object]:
        return [copy.deepcopy(e) for (n, _), e in (self.rows or {}).items() if name is None or n == name]

    def marks(self, name: str | None = None) -> dict[str, object]:
        return {n: v for n, v in self.high.items() if name is None or n == name}

    def write(self, *, add: Sequence[dict[str, object]] = (), remove: Sequence[tuple[str, int]] = (), marks: dict[str, int]) -> None:
        self.calls.append("write")
        assert self.rows is not None, "the registry writes only after create()"
        rows = dict(self.rows)  # all of the change or none of it
        for key in remove:
            rows.pop(tuple(key), None)
        for e in add:
            rows[(str(e["name"]), int(e["version"]))] = json.loads(json.dumps(e))  # stored as JSON would be
        high = dict(self.high)
        for n, v in marks.items():
            high[n] = max(v, high.get(n, 0))
        self.rows, self.high = rows, high

    def dump(self) -> dict[str, object]:
        entries = sorted(self.entries(), key=lambda e: (e["name"], e["version"]))
        return {"format": 1, "entries": entries, "high_water": dict(sorted(self.high.items()))}

    def load(self, document: dict[str, object]) -> None:
        self.rows = {(str(e["name"]), int(e["version"])): copy.deepcopy(e) for e in document["entries"]}
        self.high = dict(document.get("high_water") or {})


def _registry(kind: str, root: Path) -> AdapterRegistry:
    return AdapterRegistry(root, store=MemoryIndex()) if kind == "memory" else AdapterRegistry(root)


STORES = ["memory", "index.db"]


@pytest.fixture()
def adapter_dir(random_base, tmp_path: Path) -> Path:
    torch.manual_seed(1)
    model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    return save_adapter(model, tmp_path / "src-adapter", metadata={"digit": "7"})


def test_the_toy_store_satisfies_the_protocol() -> None:
    store: IndexStore = MemoryIndex()  # what a type checker holds it to
    missing = [
        m for m in ("exists", "writable", "create", "entries", "marks", "write", "dump", "load") if not callable(getattr(store, m, None))
    ]
    assert missing == [] and isinstance(store.path, Path)


@pytest.mark.parametrize("kind", STORES)
def test_add_then_get_by_name_and_by_name_at_version(kind: str, tmp_path: Path, adapter_dir: Path) -> None:
    reg = _registry(kind, tmp_path / "reg")
    v1 = reg.add("digit-7", adapter_dir, metrics={"accuracy": 0.9})
    v2 = reg.add("digit-7", adapter_dir)
    assert (v1.version, v2.version) == (1, 2)
    assert reg.get("digit-7").version == 2 and reg.get("digit-7@1").metrics == {"accuracy": 0.9}
    assert reg.get("digit-7@1").files == v1.files and "digit-7@2" in reg and "digit-7@3" not in reg
    assert [e.ref for e in reg.list()] == ["digit-7@1", "digit-7@2"]
    weights = reg.path("digit-7@1") / "adapter_model.safetensors"  # verified on the way
    assert weights.read_bytes() == (adapter_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(EntryNotFoundError, match="no version 3"):
        reg.get("digit-7@3")
    with pytest.raises(EntryNotFoundError, match="digit-8"):
        reg.get("digit-8")


@pytest.mark.parametrize("kind", STORES)
def test_a_removed_version_is_never_reused(kind: str, tmp_path: Path, adapter_dir: Path) -> None:
    reg = _registry(kind, tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    reg.add("digit-7", adapter_dir)
    assert [e.ref for e in reg.remove("digit-7@2")] == ["digit-7@2"]
    assert not (reg.root / "digit-7" / "v2").exists() and [e.ref for e in reg.list()] == ["digit-7@1"]
    assert reg.add("digit-7", adapter_dir).version == 3  # not 2: digit-7@2 never names other bytes
    assert {e.version for e in reg.remove("digit-7")} == {1, 3} and reg.list() == []
    assert not (reg.root / "digit-7").exists()
    assert reg.add("digit-7", adapter_dir).version == 4  # the mark outlives every version of the name


@pytest.mark.parametrize("kind", STORES)
def test_verify_names_a_tampered_file(kind: str, tmp_path: Path, adapter_dir: Path) -> None:
    reg = _registry(kind, tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    good = reg.add("digit-7", adapter_dir)
    assert reg.verify() == []
    weights = reg.root / "digit-7" / "v1" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # same size, one bit off
    weights.write_bytes(bytes(raw))
    problems = reg.verify()
    assert [ref for ref, _ in problems] == ["digit-7@1"] and "sha256" in problems[0][1]
    with pytest.raises(IntegrityError, match="sha256"):
        reg.path("digit-7@1")
    with pytest.raises(IntegrityError, match="sha256"):
        reg.read_file(reg.get("digit-7@1"), "adapter_model.safetensors")
    assert reg.read_file(good, "adapter_model.safetensors") == (adapter_dir / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("kind", STORES)
def test_a_failed_batch_leaves_the_store_and_the_folder_as_they_were(kind: str, tmp_path: Path, adapter_dir: Path) -> None:
    reg = _registry(kind, tmp_path / "reg")
    reg.add("digit-7", adapter_dir)
    before = reg.store.dump()
    with pytest.raises(RegistryError, match="neither an adapter folder"):
        reg.add_many([("good", adapter_dir, {}), ("bad", tmp_path, {})])
    assert reg.store.dump() == before and not (reg.root / "good").exists()


def test_the_memory_store_holds_the_whole_index(tmp_path: Path, adapter_dir: Path) -> None:
    """Nothing of the index reaches the disk through another door: the registry's files are the
    entries' folders (and its lock and staging folder); ``export`` still writes the exchange format."""
    store = MemoryIndex()
    reg = AdapterRegistry(tmp_path / "reg", store=store)
    reg.root.mkdir()
    assert reg.list() == [] and not store.exists()  # an empty registry: no index yet
    reg.add("digit-7", adapter_dir)
    reg.add("digit-7", adapter_dir)
    reg.remove("digit-7@1")
    assert store.calls == ["create", "write", "write", "write"] and reg.index_path == Path(":memory:")
    assert sorted(p.name for p in reg.root.iterdir() if not p.name.startswith(".")) == ["digit-7"]
    assert set(store.rows) == {("digit-7", 2)} and store.high == {"digit-7": 2}
    document = json.loads(reg.export_index().read_text())
    assert document["exported"] is True and document["high_water"] == {"digit-7": 2}
    assert [e["path"] for e in document["entries"]] == ["digit-7/v2"]


def test_what_a_store_returns_is_validated_like_any_index(tmp_path: Path, adapter_dir: Path) -> None:
    """A store is outside input: a row naming a folder outside its entry is refused, not followed."""
    store = MemoryIndex()
    reg = AdapterRegistry(tmp_path / "reg", store=store)
    reg.add("digit-7", adapter_dir)
    store.rows[("digit-7", 1)]["path"] = "../elsewhere"
    with pytest.raises(RegistryError, match=r"path '\.\./elsewhere' is not 'digit-7/v1'"):
        reg.list()
    store.rows[("digit-7", 1)]["path"] = "digit-7/v1"
    store.high["digit-7"] = -1
    with pytest.raises(RegistryError, match="invalid 'high_water' map"):
        reg.get("digit-7")

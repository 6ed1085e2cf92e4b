"""Named stacks: registry entries of kind ``stack`` (``registry add-stack NAME SPEC``), pinned to the
adapter versions and bytes they were made with, checked as outside input wherever ``stack.json`` is
read, verified with their members, refused where one adapter folder is loaded, and moved by push and
pull like any entry."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import registry_snapshot, run_cli
from hub_server import HubServer

from mnist_peft.errors import EntryNotFoundError, IntegrityError, InvalidNameError, RegistryError
from mnist_peft.io.adapters import save_adapter
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.stacks import MAX_STACK_FILE_BYTES, STACK_FILE, StackMember, read_stack_members
from mnist_peft.tuners.dora.config import DoraConfig
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry made once: a base, two LoRA adapters (digit-3, digit-9), a DoRA one (dora-1) and an
    adapter trained on another base (alien); each test works on a copy of it."""
    tmp = tmp_path_factory.mktemp("stacks")
    torch.manual_seed(0)
    base = MnistMLP().eval()
    base.save_pretrained(tmp / "src-base")
    reg = AdapterRegistry(tmp / "reg")
    reg.add("base", tmp / "src-base")
    for name, config, digit in [("digit-3", LoraConfig, 3), ("digit-9", LoraConfig, 9), ("dora-1", DoraConfig, 1)]:
        torch.manual_seed(digit)
        model = LoraModel(copy.deepcopy(base), config(r=2, lora_alpha=4, init_lora_weights=False))
        reg.add(name, save_adapter(model, tmp / f"src-{name}", metadata={"digit": str(digit)}))
    torch.manual_seed(1)
    other = LoraModel(MnistMLP().eval(), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    reg.add("alien", save_adapter(other, tmp / "src-alien"))
    return reg.root


@pytest.fixture()
def reg(template: Path, tmp_path: Path) -> AdapterRegistry:
    shutil.copytree(template, tmp_path / "reg")
    return AdapterRegistry(tmp_path / "reg")


def _sha(reg: AdapterRegistry, ref: str, fname: str = WEIGHTS) -> str:
    return str(reg.get(ref).files[fname]["sha256"])


def _rewrite_stack_file(reg: AdapterRegistry, ref: str, raw: bytes) -> None:
    """Replace a stack's ``stack.json`` and fix up the index's sha256 and size, as a careful hand-editor
    (or a hostile repo) would: the integrity check passes, so only the content checks stand."""
    entry = reg.get(ref)
    (reg.root / entry.path / STACK_FILE).write_bytes(raw)
    files = {**entry.files, STACK_FILE: {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}}
    reg.store.write(remove=[(entry.name, entry.version)], add=[{**entry.to_dict(), "files": files}], marks={entry.name: entry.version})


def test_a_stack_pins_each_adapter_to_its_version_and_bytes(reg: AdapterRegistry) -> None:
    entry = reg.add_stack("mix", [("digit-9@1", 0.5), ("digit-3", 1.0)])
    assert (entry.ref, entry.kind, entry.adapter_type, entry.digit) == ("mix@1", "stack", None, None)
    assert set(entry.files) == {STACK_FILE, "README.md"}
    assert entry.base_fingerprint == reg.get("digit-9").base_fingerprint != reg.get("alien").base_fingerprint
    members = read_stack_members(reg, entry)
    assert members == [
        StackMember("digit-9@1", 0.5, _sha(reg, "digit-9"), _sha(reg, "digit-9", "adapter_config.json"), "lora"),
        StackMember("digit-3@1", 1.0, _sha(reg, "digit-3"), _sha(reg, "digit-3", "adapter_config.json"), "lora"),
    ]
    document = json.loads((reg.root / "mix/v1" / STACK_FILE).read_bytes())
    assert document["format"] == 1 and document["members"][0]["adapter"] == "digit-9@1"
    assert "`digit-9@1` | LoRA | 0.5" in (reg.root / "mix/v1/README.md").read_text()
    assert reg.verify() == []
    # A newer digit-3 does not move the stack: "digit-3" was pinned to its version at add time.
    reg.add("digit-3", reg.path("digit-3"))
    assert [m.ref for m in read_stack_members(reg, reg.get("mix"))] == ["digit-9@1", "digit-3@1"]
    assert reg.add_stack("mix", [("digit-3", -2)]).ref == "mix@2"
    assert read_stack_members(reg, reg.get("mix")) == [
        StackMember("digit-3@2", -2.0, _sha(reg, "digit-3@1"), _sha(reg, "digit-3@1", "adapter_config.json"), "lora")
    ]
    assert reg.add_stack("solo", [("dora-1", 1)]).kind == "stack"  # a DoRA adapter alone at weight 1 is a stack


def test_the_registry_keeps_the_serving_engines_bounds() -> None:
    from mnist_peft.registry import stacks as registry_stacks
    from mnist_peft.serving import stacks as serving_stacks

    assert registry_stacks.MAX_STACK == serving_stacks.MAX_STACK == 10
    assert registry_stacks.MAX_WEIGHT == serving_stacks.MAX_WEIGHT == 10.0


_REFUSED = [
    ("a base", [("base", 1.0)], RegistryError, "is a base, not an adapter"),
    ("a stack", [("mix", 1.0)], RegistryError, "a stack holds no stacks; name its members instead: 'digit-9@1:0.5'"),
    ("DoRA beside another", [("dora-1", 1.0), ("digit-3", 1.0)], RegistryError, "'dora-1@1' is a DoRA adapter, which is served alone"),
    ("DoRA scaled", [("dora-1", 0.5)], RegistryError, "served alone at weight 1"),
    ("two bases", [("digit-3", 1.0), ("alien", 1.0)], RegistryError, "fit different bases"),
    ("weight beyond 10", [("digit-3", 10.5)], RegistryError, r"finite number in \[-10, 10\], got 10.5"),
    ("NaN weight", [("digit-3", float("nan"))], RegistryError, "finite number"),
    ("infinite weight", [("digit-3", float("-inf"))], RegistryError, "finite number"),
    ("bool weight", [("digit-3", True)], RegistryError, "the weight must be a number, got bool"),
    ("string weight", [("digit-3", "1")], RegistryError, "the weight must be a number, got str"),
    ("huge int weight", [("digit-3", 10**400)], RegistryError, "the weight must be a number, got int"),
    ("a name twice", [("digit-3@1", 1.0), ("digit-3", 0.5)], RegistryError, r"\['digit-3'\] named twice"),
    ("eleven", [(f"digit-{i}", 1.0) for i in range(11)], RegistryError, "a stack holds 1 to 10 adapters, got 11"),
    ("none", [], RegistryError, "a stack holds 1 to 10 adapters, got 0"),
    ("not a pair", [("digit-3",)], RegistryError, "each item is a"),
    ("missing entry", [("digit-4", 1.0)], EntryNotFoundError, "digit-4"),
    ("missing version", [("digit-3@7", 1.0)], EntryNotFoundError, "no version 7"),
    ("bad ref", [("../evil@1", 1.0)], InvalidNameError, "invalid registry name"),
    ("an adapter's name", "digit-3", RegistryError, "'digit-3' holds lora entries"),
    ("a bad stack name", "Mix!", InvalidNameError, "invalid registry name"),
]


@pytest.mark.parametrize(("case", "items", "error", "words"), _REFUSED, ids=[c[0] for c in _REFUSED])
def test_a_refused_stack_leaves_the_registry_byte_identical(reg: AdapterRegistry, case, items, error, words: str) -> None:
    reg.add_stack("mix", [("digit-9@1", 0.5)])
    name = "other"
    if isinstance(items, str):  # the case is the stack's name
        name, items = items, [("digit-9", 1.0)]
    before = registry_snapshot(reg.root)
    with pytest.raises(error, match=words):
        reg.add_stack(name, items)
    assert registry_snapshot(reg.root) == before
    assert [e.ref for e in reg.list()] == ["alien@1", "base@1", "digit-3@1", "digit-9@1", "dora-1@1", "mix@1"]


def test_a_stack_name_takes_no_single_adapter_and_a_stack_folder_no_other_files(reg: AdapterRegistry, tmp_path: Path) -> None:
    reg.add_stack("mix", [("digit-9", 1.0)])
    before = registry_snapshot(reg.root)
    with pytest.raises(RegistryError, match="'mix' holds stack entries"):
        reg.add("mix", reg.path("digit-3"))  # `mix` in a spec would turn from a stack into one adapter
    mixed = tmp_path / "mixed"
    shutil.copytree(reg.path("digit-3"), mixed)
    shutil.copy(reg.path("mix") / STACK_FILE, mixed)
    with pytest.raises(RegistryError, match="a stack folder holds only"):
        reg.add("mix2", mixed)
    assert registry_snapshot(reg.root) == before
    copied = reg.add("mix-copy", reg.path("mix"))  # a stack folder made elsewhere adds like any folder
    assert copied.kind == "stack" and read_stack_members(reg, copied) == read_stack_members(reg, reg.get("mix"))


def _doc(reg: AdapterRegistry, **changes) -> dict:
    member = {
        "adapter": "digit-9@1",
        "weight": 0.5,
        "sha256": _sha(reg, "digit-9"),
        "config_sha256": _sha(reg, "digit-9", "adapter_config.json"),
        "adapter_type": "lora",
    }
    member.update(changes.pop("member", {}))
    return {"format": 1, "base_fingerprint": reg.get("digit-9").base_fingerprint, "members": [member], **changes}


_HOSTILE = {
    "not JSON": (lambda r: b'{"format": 1,', "is not JSON"),
    "deep nesting": (lambda r: b"[" * 20_000 + b"]" * 20_000, "is not JSON"),
    "over the size cap": (lambda r: json.dumps(_doc(r)).encode() + b" " * MAX_STACK_FILE_BYTES, "more than a stack needs"),
    "a list": (lambda r: b"[]", "must be an object with exactly the keys"),
    "an unknown key": (lambda r: _doc(r, extra=1), "exactly the keys"),
    "format 2": (lambda r: _doc(r, format=2), "has format '2'; this mnist-peft reads format 1"),
    "format true": (lambda r: _doc(r, format=True), "has format 'True'"),
    "a bad fingerprint": (lambda r: _doc(r, base_fingerprint="zz"), "base_fingerprint must be a sha256"),
    "no members": (lambda r: _doc(r, members=[]), "'members' must be a list of 1 to 10 adapters, got 0"),
    "eleven members": (lambda r: _doc(r, members=[{}] * 11), "got 11"),
    "members not a list": (lambda r: _doc(r, members={"a": 1}), "got dict"),
    "a member missing a key": (lambda r: {**_doc(r), "members": [{"adapter": "digit-9@1"}]}, "member 1 must be an object"),
    "an unpinned ref": (lambda r: _doc(r, member={"adapter": "digit-9"}), "'digit-9' is not pinned"),
    "a path as ref": (lambda r: _doc(r, member={"adapter": "../../etc@1"}), "invalid registry name"),
    "a long ref": (lambda r: _doc(r, member={"adapter": "a" * 5000}), "'adapter' must be a registry reference"),
    "a number as ref": (lambda r: _doc(r, member={"adapter": 7}), "'adapter' must be a registry reference"),
    "a bad version": (lambda r: _doc(r, member={"adapter": "digit-9@0"}), "invalid version"),
    "a string weight": (lambda r: _doc(r, member={"weight": "0.5"}), "the weight must be a number, got str"),
    "a bool weight": (lambda r: _doc(r, member={"weight": True}), "the weight must be a number, got bool"),
    "an infinite weight": (lambda r: json.dumps(_doc(r)).replace("0.5", "1e999").encode(), "finite number"),
    "a NaN weight": (lambda r: json.dumps(_doc(r)).replace("0.5", "NaN").encode(), "finite number"),
    "a huge int weight": (lambda r: json.dumps(_doc(r)).replace("0.5", "1" + "0" * 400).encode(), "the weight must be a number, got int"),
    "a 5000-digit weight": (lambda r: json.dumps(_doc(r)).replace("0.5", "1" * 5000).encode(), "is not JSON"),
    "a weight beyond 10": (lambda r: _doc(r, member={"weight": -10.5}), "finite number in"),
    "a short sha256": (lambda r: _doc(r, member={"sha256": "abc"}), "'sha256' must be a sha256"),
    "an uppercase sha256": (lambda r: _doc(r, member={"sha256": "A" * 64}), "'sha256' must be a sha256"),
    "a bad config sha256": (lambda r: _doc(r, member={"config_sha256": None}), "'config_sha256' must be a sha256"),
    "an unknown adapter type": (lambda r: _doc(r, member={"adapter_type": "ia3"}), "adapter_type must be one of"),
    "a name twice": (lambda r: {**_doc(r), "members": _doc(r)["members"] * 2}, r"\['digit-9'\] named twice"),
    "DoRA beside another": (
        lambda r: {
            **_doc(r),
            "members": _doc(r)["members"] + _doc(r, member={"adapter": "dora-1@1", "adapter_type": "dora", "weight": 1})["members"],
        },
        "is a DoRA adapter, which is served alone",
    ),
}


@pytest.mark.parametrize("case", list(_HOSTILE))
def test_a_hand_edited_stack_file_with_its_sha256_fixed_up_is_refused_field_by_field(
    reg: AdapterRegistry, tmp_path: Path, case: str
) -> None:
    make, words = _HOSTILE[case]
    content = make(reg)
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    reg.add_stack("mix", [("digit-9@1", 0.5)])
    _rewrite_stack_file(reg, "mix", raw)
    with pytest.raises(IntegrityError, match=words):
        read_stack_members(reg, reg.get("mix"))
    problems = dict(reg.verify())
    assert list(problems) == ["mix@1"] and "stack mix@1" in problems["mix@1"]
    # The same content in a folder to add (a pulled repo, a folder made by hand) is refused before anything is written.
    folder = tmp_path / "hostile"
    folder.mkdir()
    (folder / STACK_FILE).write_bytes(raw)
    before = registry_snapshot(reg.root)
    with pytest.raises(RegistryError, match=words):
        reg.add("hostile", folder)
    assert registry_snapshot(reg.root) == before


def test_a_tampered_stack_file_or_an_edited_fingerprint_is_an_integrity_error(reg: AdapterRegistry) -> None:
    entry = reg.add_stack("mix", [("digit-9@1", 0.5)])
    path = reg.root / entry.path / STACK_FILE
    good = path.read_bytes()
    path.write_bytes(good.replace(b"0.5", b"5.0"))  # same size, other bytes: the recorded sha256 catches it
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        read_stack_members(reg, entry)
    assert "mix@1" in dict(reg.verify())
    path.write_bytes(good)
    assert reg.verify() == []
    _rewrite_stack_file(reg, "mix", json.dumps(_doc(reg, base_fingerprint="0" * 64)).encode())
    with pytest.raises(IntegrityError, match="names base 000000000000, the index records"):
        read_stack_members(reg, reg.get("mix"))
    with pytest.raises(RegistryError, match="is a lora, not a stack"):
        read_stack_members(reg, reg.get("digit-9"))


def test_verify_names_a_missing_or_changed_member_and_rm_keeps_pinned_adapters(reg: AdapterRegistry) -> None:
    from mnist_peft.registry.stacks import refuse_pinned

    reg.add_stack("mix", [("digit-9@1", 0.5), ("digit-3", 1.0)])
    before = registry_snapshot(reg.root)
    with pytest.raises(RegistryError, match=r"refusing to remove 'digit-9': stack entries use it \(mix@1 pins digit-9@1\)"):
        refuse_pinned(reg, "digit-9")  # what `registry rm` asks first (tested on the command line below)
    refuse_pinned(reg, "digit-9@7")  # a version no stack pins
    refuse_pinned(reg, "mix")  # a stack itself
    assert registry_snapshot(reg.root) == before
    # digit-3@1 now holds other bytes (as in a registry that numbered another adapter digit-3@1), the index agreeing.
    digit3 = reg.get("digit-3")
    raw = (reg.path("digit-9") / WEIGHTS).read_bytes()
    (reg.root / digit3.path / WEIGHTS).write_bytes(raw)
    files = {**digit3.files, WEIGHTS: {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}}
    reg.store.write(remove=[("digit-3", 1)], add=[{**digit3.to_dict(), "files": files}], marks={"digit-3": 1})
    assert reg.verify() == [
        ("mix@1", f"stack mix@1: member digit-3@1 has another {WEIGHTS} (sha256 {_sha(reg, 'digit-9')[:12]}, the stack pinned "
         f"{digit3.files[WEIGHTS]['sha256'][:12]}); it is not the adapter the stack was made with: re-make it with "
         "`mnist-peft registry add-stack NAME SPEC`")
    ]  # fmt: skip
    reg.store.write(remove=[("digit-3", 1)], add=[digit3.to_dict()], marks={"digit-3": 1})
    (reg.root / digit3.path / WEIGHTS).write_bytes(before[f"{digit3.path}/{WEIGHTS}"])
    assert reg.verify() == []
    # A member whose own file is altered: the stack does not verify either, and says which member.
    (reg.root / "digit-9/v1" / WEIGHTS).write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert "stack mix@1: member digit-9@1 does not verify" in dict(reg.verify())["mix@1"]
    gone = reg.remove("digit-9")  # what `registry rm --force` does
    assert [e.ref for e in gone] == ["digit-9@1"]
    assert "member digit-9@1 is not in the registry" in dict(reg.verify())["mix@1"]
    assert "`mnist-peft registry add digit-9 FOLDER" in dict(reg.verify())["mix@1"]
    assert [e.ref for e in reg.remove("mix")] == ["mix@1"] and reg.remove("digit-3")[0].ref == "digit-3@1"


def test_a_stack_where_one_adapter_folder_is_loaded_is_refused_naming_its_members(reg: AdapterRegistry) -> None:
    from mnist_peft.registry.refs import resolve_adapter

    reg.add_stack("mix", [("digit-9@1", 0.5), ("digit-3", 1.0)])
    with pytest.raises(RegistryError, match=re.escape("pass each member: --adapter digit-9@1 --weight 0.5 --adapter digit-3@1 --weight 1")):
        resolve_adapter("mix", reg)


def test_a_push_that_would_split_a_stack_from_its_pinned_versions_is_refused_before_any_network(reg: AdapterRegistry) -> None:
    from mnist_peft.hub.push import push_adapters_to_hub, push_to_hub

    reg.add_stack("mix", [("digit-9", 1.0)])
    with pytest.raises(RegistryError, match=r"\['mix@1'\] are stack entries, which are no adapter repos"):
        push_adapters_to_hub("team/x", registry=reg, names=["mix"])
    reg.add("digit-9", reg.path("digit-9"))  # digit-9@2: the latest of everything is no longer what mix pins
    with pytest.raises(RegistryError, match="stack mix@1 pins digit-9@1, but this push sends digit-9@2; a bundle repo holds one version"):
        push_to_hub("team/x", registry=reg)  # refused before the Hub is asked (no HF_ENDPOINT here)


def test_registry_add_stack_on_the_command_line(reg: AdapterRegistry) -> None:
    done = run_cli("registry", "add-stack", "mix", "digit-9@1:0.5, digit-3", "--root", str(reg.root), "--json")
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert (payload["name"], payload["version"], payload["kind"]) == ("mix", 1, "stack")
    assert payload["members"] == [
        {"adapter": "digit-9@1", "weight": 0.5, "adapter_type": "lora"},
        {"adapter": "digit-3@1", "weight": 1.0, "adapter_type": "lora"},
    ]
    before = registry_snapshot(reg.root)
    bad = run_cli("registry", "add-stack", "mix", "digit-9:0.5,base", "--root", str(reg.root))
    assert bad.returncode == 1 and bad.stdout == "", bad.stdout
    assert bad.stderr == "error: stack 'mix': 'base@1' is a base, not an adapter; a stack holds adapter entries\n"
    pinned = run_cli("registry", "rm", "digit-3", "--root", str(reg.root))
    assert pinned.returncode == 1 and pinned.stderr.startswith("error: refusing to remove 'digit-3': stack entries use it (mix@1 pins")
    assert "`mnist-peft registry rm mix`" in pinned.stderr and pinned.stderr.count("\n") == 1
    assert registry_snapshot(reg.root) == before


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    server = HubServer.start(tmp_path_factory.mktemp("hub"))
    yield server
    server.stop()


def test_a_stack_pushed_alone_takes_its_members_and_pulls_before_them(hub: HubServer, reg: AdapterRegistry, tmp_path: Path) -> None:
    env = hub.env(tmp_path / "hf-home")
    reg.add_stack("mix", [("digit-9@1", 0.5), ("digit-3", 1.0)])
    pushed = run_cli("push", "--repo-id", "team/stacks", "--name", "mix", "--root", str(reg.root), "--json", env=env)
    assert pushed.returncode == 0, pushed.stderr
    assert sorted(json.loads(pushed.stdout)["pushed"]) == ["digit-3@1", "digit-9@1", "mix@1"]
    other = tmp_path / "pulled"
    first = run_cli("pull", "--repo-id", "team/stacks", "--name", "mix", "--root", str(other), env=env)
    assert first.returncode == 0, first.stderr
    assert "note: stack mix@1: member digit-9@1 is not in the registry" in first.stdout
    assert f"`mnist-peft pull --repo-id team/stacks --name digit-9 --root {other}`" in first.stdout
    pulled = AdapterRegistry(other)
    assert [e.ref for e in pulled.list()] == ["mix@1"] and "member digit-9@1 is not in the registry" in dict(pulled.verify())["mix@1"]
    rest = run_cli("pull", "--repo-id", "team/stacks", "--root", str(other), "--json", env=env)
    assert rest.returncode == 0, rest.stderr
    payload = json.loads(rest.stdout)
    assert sorted(payload["added"]) == ["digit-3@1", "digit-9@1"] and payload["unchanged"] == ["mix"] and payload["incomplete_stacks"] == {}
    assert pulled.verify() == []
    assert (pulled.path("mix") / STACK_FILE).read_bytes() == (reg.path("mix") / STACK_FILE).read_bytes()
    assert read_stack_members(pulled, pulled.get("mix")) == read_stack_members(reg, reg.get("mix"))


def test_adding_reading_and_verifying_a_stack_imports_no_torch(reg: AdapterRegistry) -> None:
    """The registry stays torch-free for stacks (the serving engine, the CLI's registry commands and pull use it)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom mnist_peft.registry import AdapterRegistry, read_stack_members\n"
        "reg = AdapterRegistry(sys.argv[1])\nentry = reg.add_stack('mix', [('digit-9', 0.5), ('digit-3@1', 1)])\n"
        "print(len(read_stack_members(reg, entry)), reg.verify(), 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(reg.root)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "2 [] False", proc.stdout + proc.stderr

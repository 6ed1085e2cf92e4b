"""Push and pull against a real local Hub: olah for reads, tests/hub_server.py for writes."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from hub_server import HubServer, free_port

from mnist_peft.io.adapters import save_adapter
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    server = HubServer.start(tmp_path_factory.mktemp("hub"))
    yield server
    server.stop()


@pytest.fixture()
def hub_env(hub: HubServer, tmp_path: Path) -> dict[str, str]:
    return hub.env(tmp_path / "hf-home")


@pytest.fixture()
def registry(tmp_path: Path, trained_base_dir: Path) -> AdapterRegistry:
    """A registry with a base and two digit adapters."""
    from mnist_peft.model.mlp import load_base

    reg = AdapterRegistry(tmp_path / "local")
    reg.add("base", trained_base_dir, metrics={"accuracy": 0.9})
    base = load_base(trained_base_dir)
    for digit in (3, 9):
        torch.manual_seed(digit)
        model = LoraModel(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
        folder = save_adapter(model, tmp_path / f"src-{digit}", metadata={"digit": str(digit)})
        reg.add(f"digit-{digit}", folder)
    return reg


def _python(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A fresh Python (stock peft, as a user would run it) against the local Hub."""
    import os

    return subprocess.run(
        [sys.executable, "-c", code, *args], env={**os.environ, **env}, capture_output=True, text=True, cwd=REPO, timeout=120
    )


def _tree_bytes(reg: AdapterRegistry) -> dict[str, bytes]:
    return {f"{e.name}/{f}": (reg.root / e.path / f).read_bytes() for e in reg.list() for f in e.files}


@pytest.mark.slow  # trains or runs a whole Hub round trip through the CLI: CI runs it, the developer loop skips it
def test_push_then_pull_into_an_empty_root_gives_identical_bytes_and_eval(
    hub_env, registry: AdapterRegistry, tmp_path: Path, data_root
) -> None:
    pushed = run_cli("push", "--repo-id", "team/mnist-a", "--root", str(registry.root), "--json", env=hub_env)
    assert pushed.returncode == 0, pushed.stderr
    assert sorted(json.loads(pushed.stdout)["pushed"]) == ["base@1", "digit-3@1", "digit-9@1"]
    pulled_root = tmp_path / "pulled"
    pulled = run_cli("pull", "--repo-id", "team/mnist-a", "--root", str(pulled_root), "--json", env=hub_env)
    assert pulled.returncode == 0, pulled.stderr
    other = AdapterRegistry(pulled_root)
    assert _tree_bytes(other) == _tree_bytes(registry)
    assert other.verify() == []
    evals = [
        run_cli(
            "eval",
            "--base",
            "base",
            "--adapter",
            "digit-9",
            "--adapter",
            "digit-3",
            "--weight",
            "1",
            "--weight",
            "0.5",
            "--json",
            "--root",
            str(root),
        )
        for root in (registry.root, pulled_root)
    ]
    assert evals[0].returncode == 0, evals[0].stderr
    assert json.loads(evals[0].stdout) == json.loads(evals[1].stdout)
    again = run_cli("pull", "--repo-id", "team/mnist-a", "--root", str(pulled_root), "--json", env=hub_env)
    assert json.loads(again.stdout)["added"] == [] and len(other.list()) == 3


_STOCK_PEFT = """
import sys, torch, peft
from mnist_peft import MnistMLP
repo = sys.argv[1]
model = peft.PeftModel.from_pretrained(MnistMLP.from_pretrained(repo), repo, subfolder="digit-9")
A = model.base_model.model.linear2.lora_A["default"].weight
print(float(A.abs().sum()))
"""


def test_stock_peft_loads_an_adapter_from_the_hub_by_repo_id_and_subfolder(hub_env, registry: AdapterRegistry) -> None:
    assert run_cli("push", "--repo-id", "team/mnist-b", "--root", str(registry.root), env=hub_env).returncode == 0

    proc = _python(_STOCK_PEFT, "team/mnist-b", env=hub_env)
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    local = load_file(str(registry.path("digit-9") / "adapter_model.safetensors"))
    assert float(proc.stdout.strip()) == pytest.approx(float(local["base_model.model.linear2.lora_A.weight"].abs().sum()), rel=1e-6)


def test_revision_pinning_returns_the_old_bytes_after_a_second_push(
    hub_env, registry: AdapterRegistry, tmp_path: Path, random_base
) -> None:
    first = json.loads(run_cli("push", "--repo-id", "team/mnist-c", "--root", str(registry.root), "--json", env=hub_env).stdout)
    old = (registry.path("digit-9") / "adapter_model.safetensors").read_bytes()
    from mnist_peft.model.mlp import load_base

    torch.manual_seed(123)
    model = LoraModel(load_base(registry.path("base")), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    registry.add("digit-9", save_adapter(model, tmp_path / "new-9", metadata={"digit": "9"}))
    second = run_cli("push", "--repo-id", "team/mnist-c", "--root", str(registry.root), "--name", "digit-9", "--json", env=hub_env)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["commit"] != first["commit"]
    for revision, expected in ((first["commit"], old), ("main", (registry.path("digit-9") / "adapter_model.safetensors").read_bytes())):
        root = tmp_path / f"pin-{revision}"
        pulled = run_cli("pull", "--repo-id", "team/mnist-c", "--revision", revision, "--name", "digit-9", "--root", str(root), env=hub_env)
        assert pulled.returncode == 0, pulled.stderr
        assert (AdapterRegistry(root).path("digit-9") / "adapter_model.safetensors").read_bytes() == expected
    assert old != expected


def test_server_down_gives_a_clear_error_and_changes_nothing(registry: AdapterRegistry, tmp_path: Path) -> None:
    env = {
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2",
    }
    index = registry.index_path.read_bytes()
    for cmd in ("push", "pull"):
        proc = run_cli(cmd, "--repo-id", "team/down", "--root", str(registry.root), env=env, timeout=120)
        assert proc.returncode == 1
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {cmd} failed") and "HF_ENDPOINT" in lines[0]
    assert registry.index_path.read_bytes() == index


def test_a_file_tampered_with_on_the_server_is_refused_on_pull(hub: HubServer, hub_env, registry: AdapterRegistry, tmp_path: Path) -> None:
    assert run_cli("push", "--repo-id", "team/mnist-d", "--root", str(registry.root), env=hub_env).returncode == 0
    entry = registry.get("digit-3")
    oid = entry.files["adapter_model.safetensors"]["sha256"]
    obj = hub.lfs_object_path("team/mnist-d", str(oid))
    data = bytearray(obj.read_bytes())
    data[-3] ^= 0xFF
    obj.write_bytes(bytes(data))
    root = tmp_path / "victim"
    proc = run_cli("pull", "--repo-id", "team/mnist-d", "--root", str(root), env=hub_env)
    assert proc.returncode == 1 and "digit-3/adapter_model.safetensors" in proc.stderr and "sha256" in proc.stderr
    assert not root.exists()  # nothing half-pulled: not even the folder
    ok = run_cli("pull", "--repo-id", "team/mnist-d", "--root", str(root), "--name", "digit-9", env=hub_env)
    assert ok.returncode == 0 and [e.name for e in AdapterRegistry(root).list()] == ["digit-9"]


_PEFT_BY_TAG = """
import sys, torch
from peft import PeftModel
from mnist_peft import MnistMLP
base_id, adapter_id, *revisions = sys.argv[1:]
for revision in revisions:  # one Python for all (importing peft takes seconds)
    model = PeftModel.from_pretrained(MnistMLP.from_pretrained(base_id), adapter_id, revision=revision)
    print(model.peft_config["default"].base_model_name_or_path, float(model.base_model.model.linear2.lora_A["default"].weight.abs().sum()))
"""


@pytest.mark.slow  # trains or runs a whole Hub round trip through the CLI: CI runs it, the developer loop skips it
def test_per_adapter_repos_are_hub_native_and_every_version_is_a_tag(hub_env, registry: AdapterRegistry, tmp_path: Path) -> None:
    """push --per-adapter: base at ID, each adapter at ID-NAME with its versions as tags v1, v2;
    stock peft loads a tag; pull NAME@N fetches that tag; a second push adds only the new version."""

    from huggingface_hub import HfApi, ModelCard
    from safetensors.torch import load_file

    from mnist_peft.model.mlp import load_base

    torch.manual_seed(77)
    model = LoraModel(load_base(registry.path("base")), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    registry.add("digit-9", save_adapter(model, tmp_path / "new-9", metadata={"digit": "9"}), metrics={"accuracy": 0.9876})
    pushed = run_cli("push", "--repo-id", "team/per", "--per-adapter", "--root", str(registry.root), "--json", env=hub_env)
    assert pushed.returncode == 0, pushed.stderr
    repos = {r["repo_id"]: r["pushed"] for r in json.loads(pushed.stdout)["repos"]}
    assert repos == {"team/per": ["base@1"], "team/per-digit-3": ["digit-3@1"], "team/per-digit-9": ["digit-9@1", "digit-9@2"]}

    api = HfApi(endpoint=hub_env["HF_ENDPOINT"])  # this process imported huggingface_hub before HF_ENDPOINT was set
    assert sorted(t.name for t in api.list_repo_refs("team/per-digit-9").tags) == ["v1", "v2"]
    card = ModelCard.load(api.hf_hub_download("team/per-digit-9", "README.md", revision="v2", cache_dir=tmp_path / "cache"))
    assert card.data.base_model == "team/per" and card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-classification" and "digit-9" in card.data.tags
    assert card.data.eval_results[0].metric_type == "accuracy" and card.data.eval_results[0].metric_value == pytest.approx(0.9876)

    proc = _python(_PEFT_BY_TAG, "team/per", "team/per-digit-9", "v1", "v2", env=hub_env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    for line, version in zip(lines, (1, 2), strict=True):
        config_base, total = line.split()
        local = load_file(str(registry.path(f"digit-9@{version}") / "adapter_model.safetensors"))
        assert config_base == "team/per"
        assert float(total) == pytest.approx(float(local["base_model.model.linear2.lora_A.weight"].abs().sum()), rel=1e-6)

    root = tmp_path / "pulled"
    pulled = run_cli("pull", "--repo-id", "team/per-digit-9", "--name", "digit-9@1", "--root", str(root), "--json", env=hub_env)
    assert pulled.returncode == 0, pulled.stderr
    entry = AdapterRegistry(root).get("digit-9")
    assert entry.source["repo_id"] == "team/per-digit-9" and entry.source["tag"] == "v1" and len(entry.source["revision"]) == 40
    got = (AdapterRegistry(root).path("digit-9") / "adapter_model.safetensors").read_bytes()
    assert got == (registry.path("digit-9@1") / "adapter_model.safetensors").read_bytes()
    wrong = run_cli("pull", "--repo-id", "team/per-digit-9", "--name", "digit-9@7", "--root", str(root), env=hub_env)
    assert wrong.returncode == 1 and len(wrong.stderr.strip().splitlines()) == 1, wrong.stderr

    registry.add("digit-9", save_adapter(model, tmp_path / "third-9", metadata={"digit": "9"}))
    again = run_cli("push", "--repo-id", "team/per", "--per-adapter", "--root", str(registry.root), "--json", env=hub_env)
    assert again.returncode == 0, again.stderr
    repos = {r["repo_id"]: r["pushed"] for r in json.loads(again.stdout)["repos"]}
    assert repos["team/per-digit-9"] == ["digit-9@3"] and repos["team/per-digit-3"] == []


def test_a_per_adapter_push_never_calls_other_bytes_by_an_existing_tag(hub_env, registry: AdapterRegistry, tmp_path: Path) -> None:
    """A second registry whose digit-3@1 is other weights cannot publish them as the repo's v1."""
    from mnist_peft.model.mlp import load_base

    assert run_cli("push", "--repo-id", "team/tagged", "--per-adapter", "--root", str(registry.root), env=hub_env).returncode == 0
    other = AdapterRegistry(tmp_path / "other")
    other.add("base", registry.path("base"))
    torch.manual_seed(4242)
    model = LoraModel(load_base(registry.path("base")), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    other.add("digit-3", save_adapter(model, tmp_path / "other-3", metadata={"digit": "3"}))
    clash = run_cli("push", "--repo-id", "team/tagged", "--per-adapter", "--root", str(other.root), "--name", "digit-3", env=hub_env)
    assert clash.returncode == 1 and "tag v1 of 'team/tagged-digit-3' holds other weights" in clash.stderr, clash.stderr
    same = run_cli("push", "--repo-id", "team/tagged", "--per-adapter", "--root", str(registry.root), "--json", env=hub_env)
    assert same.returncode == 0 and all(r["pushed"] == [] for r in json.loads(same.stdout)["repos"][1:]), same.stdout

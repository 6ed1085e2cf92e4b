"""The merge-method seam: a toy method registered by name is offered and run by ``combine_adapters``
and by the real CLI (``combine --method``), with nothing else changed."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli

from mnist_peft.errors import AdapterConfigError
from mnist_peft.io.adapters import AdapterFiles, read_adapter, write_adapter
from mnist_peft.merging.combine import combine_adapters
from mnist_peft.merging.methods import DELTA_METHODS, MERGE_METHODS, METHODS, get_merge_method, register_merge_method
from mnist_peft.merging.svd import svd_factors
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.tuners.lora.config import LoraConfig, compute_scaling
from mnist_peft.tuners.lora.model import LoraModel

TOY = "mean_of_deltas"
# The toy's update, factored back by a rank-r SVD that keeps every direction (r >= the sum of the
# input ranks): B @ A equals it up to float32 rounding of ~1e-6 relative.
RECONSTRUCTION_TOLERANCE = 1e-5


def mean_of_deltas(deltas: Sequence[torch.Tensor], weights: Sequence[float], **options: object) -> torch.Tensor:
    """The toy: the mean of the weighted updates (task arithmetic divided by how many adapters hold the layer)."""
    return sum(w * d for w, d in zip(weights, deltas, strict=True)) / len(deltas)


# The same toy as a plugin module the CLI subprocess imports: registering is its only side effect.
PLUGIN = f"""
from mnist_peft.merging.methods import register_merge_method


def mean_of_deltas(deltas, weights, **options):
    return sum(w * d for w, d in zip(weights, deltas, strict=True)) / len(deltas)


register_merge_method({TOY!r}, mean_of_deltas)
"""


@pytest.fixture()
def toy_registered() -> Iterator[None]:
    register_merge_method(TOY, mean_of_deltas)
    try:
        yield
    finally:
        MERGE_METHODS.pop(TOY)


def _adapters(r: int = 2) -> list[AdapterFiles]:
    """Two random adapters on ``linear3`` only (a 10 x 2000 update: the SVD stays cheap)."""
    torch.manual_seed(0)
    base = MnistMLP()
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = LoraModel(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["linear3"], init_lora_weights=False))
        files.append(AdapterFiles(model.peft_config["default"], model.lora_state_dict(), {}))
    return files


def _delta(files: AdapterFiles) -> torch.Tensor:
    c = files.config
    sd = files.state_dict
    return (sd["linear3.lora_B.weight"].float() @ sd["linear3.lora_A.weight"].float()) * compute_scaling(c.r, c.lora_alpha, c.use_rslora)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).norm() <= RECONSTRUCTION_TOLERANCE * b.norm())


def test_a_registered_method_is_listed_and_runs_through_combine_adapters(toy_registered: None) -> None:
    files, weights = _adapters(), [1.0, 0.5]
    assert TOY in METHODS and TOY in DELTA_METHODS and get_merge_method(TOY).fn is mean_of_deltas
    expected = mean_of_deltas([_delta(f) for f in files], weights)
    summed = combine_adapters(files, weights, method="task_arithmetic", r=4)
    result = combine_adapters(files, weights, method=TOY, r=4)
    # the toy changes the outcome (so the checks below are not trivial): half of task arithmetic
    got = result.state_dict["linear3.lora_B.weight"] @ result.state_dict["linear3.lora_A.weight"]
    task = summed.state_dict["linear3.lora_B.weight"] @ summed.state_dict["linear3.lora_A.weight"]
    assert not _close(got, task) and _close(got, expected) and _close(2 * got, task)
    # exactly what combine_adapters promises a "deltas" method: the toy's update, truncated by svd_factors
    A, B, err = svd_factors(expected, 4)
    assert torch.equal(result.state_dict["linear3.lora_A.weight"], A) and torch.equal(result.state_dict["linear3.lora_B.weight"], B)
    assert result.config.r == 4 and result.relative_error == {"linear3": err}


def test_a_taken_name_is_refused_and_an_unregistered_one_is_unknown(toy_registered: None) -> None:
    with pytest.raises(AdapterConfigError, match="already registered"):
        register_merge_method(TOY, mean_of_deltas)
    with pytest.raises(AdapterConfigError, match="already registered"):
        register_merge_method("another", mean_of_deltas, peft_name="ties_svd")
    with pytest.raises(AdapterConfigError, match=rf"unknown combination method 'no_such'; use one of cat, svd, .*{TOY}"):
        combine_adapters(_adapters(), method="no_such")


def test_the_toy_leaves_the_table_with_its_fixture() -> None:
    assert TOY not in METHODS  # the fixture above popped it: no other test sees a toy
    with pytest.raises(AdapterConfigError, match=f"unknown combination method '{TOY}'"):
        combine_adapters(_adapters(), method=TOY)


def _cli_with_plugin(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess that first imports the plugin module (which registers the toy)."""
    (tmp_path / "toy_merge_plugin.py").write_text(PLUGIN)
    code = "import sys, toy_merge_plugin\nfrom mnist_peft.cli import main\nraise SystemExit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def test_the_cli_offers_and_runs_a_method_a_plugin_registered(tmp_path: Path) -> None:
    files, weights = _adapters(), [1.0, 0.5]
    for i, f in enumerate(files):
        write_adapter(f, tmp_path / f"a{i}")
    out = tmp_path / "toy-out"
    proc = _cli_with_plugin(
        tmp_path, "combine", "--adapter", str(tmp_path / "a0"), "--adapter", str(tmp_path / "a1"), "--weight", "1", "--weight", "0.5",
        "--method", TOY, "--r", "4", "--out", str(out), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    written = read_adapter(out)
    assert written.metadata["method"] == TOY and written.config.r == 4
    got = written.state_dict["linear3.lora_B.weight"] @ written.state_dict["linear3.lora_A.weight"]
    expected = mean_of_deltas([_delta(f) for f in files], weights)
    assert _close(got, expected) and not _close(got, 2 * expected)


def test_an_unknown_method_is_a_usage_error_naming_the_choices(tmp_path: Path) -> None:
    args = ("combine", "--adapter", "x", "--method", "no_such", "--out", str(tmp_path / "o"))
    plain = run_cli(*args)
    assert plain.returncode == 2 and "invalid choice: 'no_such'" in plain.stderr
    assert "'cat', 'svd', 'task_arithmetic'" in plain.stderr and TOY not in plain.stderr
    with_toy = _cli_with_plugin(tmp_path, *args)
    assert with_toy.returncode == 2 and "invalid choice: 'no_such'" in with_toy.stderr and f"'{TOY}'" in with_toy.stderr
    assert not (tmp_path / "o").exists()

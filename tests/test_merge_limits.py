"""Issue 22, ``combine``: weights, density, seed and rank are checked before any work (CLI and API),
every method's result is checked before anything is written, and a failing SVD is one line, not a bug."""

from __future__ import annotations

import copy
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from mnist_peft.errors import AdapterConfigError, InvalidArgumentError, MergeError
from mnist_peft.io.adapters import read_adapter, save_adapter
from mnist_peft.merging.combine import combine_adapters, max_rank
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel
from mnist_peft.tuners.lora.targets import lora_layers


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two rank-4 adapters of the full-size MLP (784-1000-2000-10), with outputs ~1e4-1e5 on the
    probe batch: usable, but large enough that weights of 1e4 overflow the combination's bound."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(0)
    base = MnistMLP().eval()
    out = []
    for i, scale in enumerate((1.0, 300.0)):
        model = LoraModel(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
        with torch.no_grad():
            for _, layer in lora_layers(model.model):
                layer.lora_B["default"].mul_(scale)
        out.append(save_adapter(model, root / f"a{i}"))
    return out


def _combine(folders: list[Path], out: Path, *extra: str, capsys: pytest.CaptureFixture[str] | None = None):
    """The real ``mnist-peft combine``: in this process when given ``capsys`` (the checks that end
    before any work: quicker than a new interpreter), else in a subprocess."""
    args = ["combine", *[x for f in folders for x in ("--adapter", str(f))], "--out", str(out), *extra]
    if capsys is None:
        return run_cli(*args)
    from mnist_peft.cli.main import main

    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e308"])
def test_a_non_finite_or_huge_weight_is_refused_before_any_work(
    folders: list[Path], tmp_path: Path, weight: str, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = _combine(folders, tmp_path / "out", "--weight", "1", f"--weight={weight}", capsys=capsys)
    assert proc.returncode == 2 and "--weight" in proc.stderr and "10000" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
    files = [read_adapter(f) for f in folders]
    with pytest.raises(InvalidArgumentError, match="weight 2"):
        combine_adapters(files, [1.0, float(weight)])


@pytest.mark.parametrize("method", ["cat", "task_arithmetic", "ties"])
def test_a_result_that_overflows_is_refused_and_nothing_is_written(folders: list[Path], tmp_path: Path, method: str) -> None:
    extra = ["--density", "0.5"] if method == "ties" else []
    proc = _combine(folders, tmp_path / "out", "--method", method, "--weight", "10000", "--weight", "10000", *extra)
    assert proc.returncode == 1, proc.stderr
    assert "probe batch" in proc.stderr and "a bug" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["svd", "task_arithmetic", "dare_linear"])
def test_a_non_finite_input_is_one_line_error_never_a_linalg_bug(folders: list[Path], tmp_path: Path, method: str) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(folders[0], tmp_path / "nan"))  # forged on disk: save_adapter/write_adapter refuse NaN
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.linear2.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, weights, metadata=read_adapter(folders[0]).metadata)
    extra = ["--r", "4"] + (["--density", "0.5"] if method == "dare_linear" else [])
    proc = _combine([folder, folders[1]], tmp_path / "out", "--method", method, *extra)
    assert proc.returncode == 1 and "linear2.lora_B.weight" in proc.stderr and "NaN or Inf" in proc.stderr, proc.stderr
    assert "LinAlgError" not in proc.stderr and "a bug" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_failing_svd_becomes_a_merge_error(folders: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", fail)
    files = [read_adapter(f) for f in folders]
    with pytest.raises(MergeError, match=r"the svd combination failed: .*converge"):
        combine_adapters(files, method="svd", r=4)


def test_rank_is_bounded_by_the_layers_before_the_work(folders: list[Path], tmp_path: Path) -> None:
    files = [read_adapter(f) for f in folders]
    assert max_rank(files, "svd") == 8  # min(in, out, 4 + 4) for every layer
    assert max_rank(files, "ties") == 1000  # min(in, out): linear2 is 1000 -> 2000
    start = time.perf_counter()
    proc = _combine(folders, tmp_path / "out", "--method", "svd", "--r", "100000")
    assert proc.returncode == 1 and "--r 100000" in proc.stderr and "--r <= 8" in proc.stderr, proc.stderr
    assert time.perf_counter() - start < 60 and not (tmp_path / "out").exists()  # was 47 s and a 2.7 GB folder
    with pytest.raises(AdapterConfigError, match="--r <= 1000"):
        combine_adapters(files, method="ties", r=1001, density=0.5)
    assert combine_adapters(files, method="svd", r=8).config.r == 8  # the bound itself is allowed


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--density", "1e-300", "[0.0001, 1]"),
        ("--density", "0", "[0.0001, 1]"),
        ("--seed", str(2**70), "2**64-1"),
        ("--seed", "-1", "2**64-1"),
        ("--seed", "9" * 5000, "not an integer"),
        ("--r", "0", ">= 1"),
    ],
)
def test_density_seed_and_rank_flags_get_one_line_errors_naming_the_range(
    folders: list[Path], tmp_path: Path, flag: str, value: str, says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = _combine(folders, tmp_path / "out", "--method", "dare_linear", "--density", "0.5", "--r", "4", f"{flag}={value}", capsys=capsys)
    assert proc.returncode == 2 and f"argument {flag}" in proc.stderr and says in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


def test_the_api_refuses_the_same_density_and_seed(folders: list[Path]) -> None:
    files = [read_adapter(f) for f in folders]
    with pytest.raises(AdapterConfigError, match=r"density must be in \[0.0001, 1\]"):
        combine_adapters(files, method="dare_linear", density=1e-300, r=4)
    with pytest.raises(AdapterConfigError, match=r"seed must be an integer from 0 to 2\*\*64-1"):
        combine_adapters(files, method="dare_linear", density=0.5, r=4, seed=2**70)
    done = combine_adapters(files, method="dare_linear", density=0.5, r=4, seed=2**64 - 1)  # the top of the range works
    assert all(torch.isfinite(t).all() for t in done.state_dict.values())

"""The adversarial review of issue 22's change: configs bounded in size and depth, nothing diverged
written, stack weights and base outputs bounded, training flags checked before the work."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import load_file

from mnist_peft.errors import AdapterConfigError, CorruptFileError, NonFiniteError, TrainConfigError
from mnist_peft.io.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, read_adapter, save_adapter
from mnist_peft.io.probe import probe_adapter_bytes
from mnist_peft.merging.combine import combine_adapters
from mnist_peft.model.data import MnistSplit
from mnist_peft.model.mlp import MnistMLP, load_base
from mnist_peft.numerics import MAX_WEIGHT
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.training.loop import MAX_BATCH_SIZE, TrainConfig, evaluate
from mnist_peft.training.recipes import AdapterRecipe, train_adapter
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel
from mnist_peft.tuners.lora.targets import check_rank, lora_layers

DEEP = b"[" * 30_000 + b"]" * 30_000  # 60 KB: under the size bound, so the depth is what is refused


def _small_base() -> MnistMLP:
    torch.manual_seed(0)
    return MnistMLP(48, 32, in_features=40).eval()


def _adapter(tmp_path: Path, name: str = "a") -> Path:
    torch.manual_seed(1)
    model = LoraModel(_small_base(), LoraConfig(r=2, lora_alpha=2, init_lora_weights=False))
    return save_adapter(model, tmp_path / name)


def _with_config(src: Path, dst: Path, config: bytes) -> Path:
    shutil.copytree(src, dst)
    (dst / ADAPTER_CONFIG_NAME).write_bytes(config)
    return dst


# ----------------------------------------------------------------------------- 1. configs: size and depth
@pytest.mark.parametrize("kind", ["deep", "huge"])
def test_a_deep_or_huge_adapter_config_is_a_one_line_corrupt_file_error_at_read_add_and_verify(tmp_path: Path, kind: str) -> None:
    config = b'{"r": 2, "x": ' + DEEP + b"}" if kind == "deep" else b'{"r": 2, "pad": "' + b"x" * 200_000 + b'"}'
    folder = _with_config(_adapter(tmp_path), tmp_path / kind, config)
    words = "nests its JSON too deeply" if kind == "deep" else "above the 65,536 a config may have"
    with pytest.raises(CorruptFileError, match=words) as info:
        read_adapter(folder)
    assert "adapter_config.json" in str(info.value) and len(str(info.value)) < 300
    reg = AdapterRegistry(tmp_path / "reg")
    with pytest.raises(CorruptFileError, match=words):
        reg.add("bad", folder)
    assert not (tmp_path / "reg" / "bad").exists()
    weights = (folder / ADAPTER_WEIGHTS_NAME).read_bytes()
    with pytest.raises(CorruptFileError, match=words):  # registry verify's torch-free reader
        probe_adapter_bytes(config, weights, what="adapter bad@1", path=str(folder / ADAPTER_WEIGHTS_NAME))


def test_combine_and_eval_refuse_a_deep_adapter_config_in_one_line_not_as_a_bug(tmp_path: Path) -> None:
    folder = _with_config(REPO / "adapters" / "digit-3" / "v1", tmp_path / "deep", b'{"r": 4, "x": ' + DEEP + b"}")
    for args in (
        ["combine", "--adapter", str(folder), "--out", str(tmp_path / "out")],
        ["eval", "--base", "base", "--adapter", str(folder)],
    ):
        proc = run_cli(*args)
        assert proc.returncode == 1 and "nests its JSON too deeply" in proc.stderr, proc.stderr
        assert "RecursionError" not in proc.stderr and "a bug" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_an_unknown_config_key_with_a_long_value_is_warned_about_in_a_short_line(tmp_path: Path) -> None:
    src = _adapter(tmp_path)
    data = json.loads((src / ADAPTER_CONFIG_NAME).read_bytes())
    folder = _with_config(src, tmp_path / "long", json.dumps({**data, "y" * 500: "v" * 50_000}).encode())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_adapter(folder)
    (warning,) = [w for w in caught if "ignoring unknown adapter config key" in str(w.message)]
    assert len(str(warning.message)) < 400 and "50,000 characters" in str(warning.message)


@pytest.mark.parametrize("kind", ["deep-config", "huge-config", "deep-header"])
def test_a_base_with_a_deep_or_huge_config_or_header_is_a_one_line_corrupt_file_error(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "base"
    _small_base().save_pretrained(folder)
    if kind == "deep-config":
        (folder / "config.json").write_bytes(b'{"a": ' + DEEP + b"}")
    elif kind == "huge-config":
        (folder / "config.json").write_bytes(b'{"in_features": 40, "pad": "' + b"x" * 1_000_000 + b'"}')
    else:
        header = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    words = {"deep-config": "nests its JSON too deeply", "huge-config": "is 1,000,030 bytes, above", "deep-header": "nested too deeply"}[
        kind
    ]
    with pytest.raises(CorruptFileError, match=words):
        load_base(folder)
    with pytest.raises(CorruptFileError, match=words):  # the Hub mixin's own entry point too
        MnistMLP.from_pretrained(str(folder))
    with pytest.raises(CorruptFileError, match=words):
        AdapterRegistry(tmp_path / "reg").add("base", folder)


# ----------------------------------------------------------------------------- 2. nothing diverged is written
def test_save_adapter_refuses_nan_and_overflowing_adapters_and_writes_nothing(tmp_path: Path) -> None:
    for poison, words in ((float("nan"), "holds NaN or Inf"), (1e19, "probe batch")):
        torch.manual_seed(1)
        model = LoraModel(_small_base(), LoraConfig(r=2, lora_alpha=2, init_lora_weights=False))
        with torch.no_grad():
            next(layer for _, layer in lora_layers(model.model)).lora_B["default"].fill_(poison)
        with pytest.raises(NonFiniteError, match=words):
            save_adapter(model, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_lora_alpha_is_bounded_to_a_sane_range() -> None:
    assert LoraConfig(lora_alpha=1e6).lora_alpha == 1e6
    for bad in (1e12, 1e30):
        with pytest.raises(AdapterConfigError, match=r"lora_alpha must be > 0 and at most 1e\+06"):
            LoraConfig(lora_alpha=bad)


def test_training_that_diverges_stops_with_a_named_error_and_the_cli_writes_nothing(tmp_path: Path, data_root: Path) -> None:
    base = load_base(REPO / "adapters" / "base" / "v1")
    with pytest.raises(TrainConfigError, match=r"at step \d+: training diverged; lower --lr \(now 1e\+30\)"):
        train_adapter(base, 3, "replay", steps=5, lr=1e30, val_size=0, data_dir=str(data_root))
    out = tmp_path / "digit-3"
    proc = run_cli("train-adapter", "--base", "base", "--digit", "3", "--steps", "5", "--lr", "1e12", "--out", str(out))
    assert proc.returncode == 1 and "training diverged" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not out.exists()


# ----------------------------------------------------------------------------- 3. stack weights and outputs bounded
def test_a_stack_weight_has_the_bound_of_a_combine_weight() -> None:
    model = LoraModel(_small_base(), LoraConfig(r=2))
    model.set_adapter(["default"], [MAX_WEIGHT])
    with pytest.raises(AdapterConfigError, match=r"stack weight of 'default' must be within \+-10000"):
        model.set_adapter(["default"], [1e30])
    assert model.adapter_weights == {"default": MAX_WEIGHT}
    files = read_adapter(REPO / "adapters" / "digit-3" / "v1")
    with pytest.raises(ValueError, match=r"within \+-10000"):
        combine_adapters([files], [MAX_WEIGHT * 1.01])


def test_cli_eval_and_merge_refuse_a_weight_of_1e30(tmp_path: Path) -> None:
    for args in (
        ["eval", "--base", "base", "--adapter", "digit-3", "--weight", "1e30", "--json"],
        ["merge", "--base", "base", "--adapter", "digit-3", "--weight", "1e30", "--out", str(tmp_path / "merged")],
    ):
        proc = run_cli(*args)
        assert proc.returncode == 1 and "within +-10000" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "merged").exists()


def test_evaluate_refuses_non_finite_or_huge_logits_instead_of_scoring_them() -> None:
    split = MnistSplit(torch.rand(20, 40), torch.arange(20) % 10)
    for poison in (float("nan"), 1e30):
        model = _small_base()
        with torch.no_grad():
            model.linear3.bias.fill_(poison)
        with pytest.raises(NonFiniteError, match="model's outputs"):
            evaluate(model, split)


def test_a_base_with_finite_weights_whose_outputs_overflow_is_refused_by_load_and_add(tmp_path: Path) -> None:
    base = _small_base()
    with torch.no_grad():
        base.linear3.weight.mul_(1e30)  # finite, yet the logits are 1e29 or Inf
    base.save_pretrained(tmp_path / "big")
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "big" / "model.safetensors").values())
    with pytest.raises(NonFiniteError, match="probe batch"):
        load_base(tmp_path / "big")
    with pytest.raises(NonFiniteError, match="probe batch"):
        AdapterRegistry(tmp_path / "reg").add("base", tmp_path / "big")
    assert not (tmp_path / "reg" / "base").exists()


# ----------------------------------------------------------------------------- 4. training flags before the work
def test_batch_size_and_seed_are_bounded_where_recipes_and_configs_are_made() -> None:
    assert TrainConfig(batch_size=MAX_BATCH_SIZE, seed=2**64 - 1).batch_size == 60_000
    for cls in (TrainConfig, AdapterRecipe):
        with pytest.raises(TrainConfigError, match=r"batch_size \(--batch-size\) must be an integer from 1 to 60,000"):
            cls(batch_size=10_000_000)
        with pytest.raises(TrainConfigError, match=r"seed \(--seed\) must be an integer from 0 to 2\*\*64-1"):
            cls(seed=2**70)
        with pytest.raises(TrainConfigError, match=r"seed \(--seed\)"):
            cls(seed=-1)


def test_rank_above_every_target_layer_is_refused_before_anything_is_allocated(data_root: Path) -> None:
    base = _small_base()  # 40 -> 48 -> 32 -> 10: the highest rank an update can have is 40
    check_rank(base, LoraConfig(r=40))  # r above linear3's 10 is allowed, as in peft
    with pytest.raises(AdapterConfigError, match=r"r=41 \(--r\) is above the highest rank .* \(40"):
        check_rank(base, LoraConfig(r=41))
    start = time.perf_counter()
    with pytest.raises(AdapterConfigError, match=r"r=100000 \(--r\).*use --r <= 1000"):
        train_adapter(MnistMLP(), 3, "replay", r=100_000, data_dir=str(data_root))
    assert time.perf_counter() - start < 5  # refused before data or factors (r=100,000 took minutes and GBs)


def test_cli_train_adapter_refuses_huge_batch_seed_and_rank_in_one_line(tmp_path: Path) -> None:
    for flag, value, words in (
        ("--batch-size", "10000000", "--batch-size"),
        ("--seed", "1180591620717411303424", "2**64-1"),
        ("--r", "100000", "--r"),
    ):
        out = tmp_path / flag.strip("-")
        proc = run_cli("train-adapter", "--base", "base", "--digit", "3", "--steps", "5", flag, value, "--out", str(out))
        assert proc.returncode != 0 and words in proc.stderr and "a bug" not in proc.stderr and "Overflow" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") <= 2 and not out.exists(), proc.stderr  # argparse adds a usage line

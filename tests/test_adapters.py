"""Adapter folders in PEFT layout: both-way compatibility with stock peft, bad files, fingerprints."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mnist_peft.errors import AdapterConfigError, AdapterKeyError, AdapterShapeError, FingerprintMismatchError
from mnist_peft.io.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, load_adapter, load_stack, read_adapter, save_adapter
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel


@pytest.fixture()
def saved(random_base: MnistMLP, tmp_path: Path):
    torch.manual_seed(1)
    model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)).eval()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    random_base.save_pretrained(base_dir)
    save_adapter(model, adapter_dir, metadata={"digit": "9"}, base_model_name_or_path=str(base_dir))
    return model, base_dir, adapter_dir


def test_folder_is_in_peft_layout(saved) -> None:
    _, _, folder = saved
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    cfg = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"] == ["linear1", "linear2", "linear3"]
    keys = set(load_file(str(folder / ADAPTER_WEIGHTS_NAME)))
    assert "base_model.model.linear2.lora_A.weight" in keys and len(keys) == 6
    with safe_open(str(folder / ADAPTER_WEIGHTS_NAME), "pt") as f:
        assert f.metadata()["digit"] == "9" and len(f.metadata()["base_fingerprint"]) == 64
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")


def test_stock_peft_loads_our_folder_with_identical_outputs(saved) -> None:
    import peft

    ours, base_dir, folder = saved
    x = torch.randn(16, 784)
    theirs = peft.PeftModel.from_pretrained(MnistMLP.from_pretrained(base_dir), str(folder)).eval()
    from mnist_peft.tuners.lora.model import set_forward_mode

    set_forward_mode(ours, "exact")
    with torch.no_grad():
        assert not torch.equal(ours(x), MnistMLP.from_pretrained(base_dir)(x))
        assert torch.equal(theirs(x), ours(x))


def test_we_load_a_folder_written_by_peft_with_identical_outputs(random_base: MnistMLP, tmp_path: Path) -> None:
    import peft

    torch.manual_seed(2)
    theirs = peft.get_peft_model(
        copy.deepcopy(random_base), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["linear2", "linear1"], init_lora_weights=False)
    ).eval()
    theirs.save_pretrained(tmp_path / "peft-adapter")
    ours = LoraModel(copy.deepcopy(random_base))
    files = load_adapter(ours, tmp_path / "peft-adapter", activate=True)
    assert files.config.r == 8 and files.config.target_modules == ["linear1", "linear2"]
    from mnist_peft.tuners.lora.model import set_forward_mode

    set_forward_mode(ours, "exact")
    x = torch.randn(16, 784)
    with torch.no_grad():
        assert not torch.equal(ours(x), random_base(x))
        assert torch.equal(ours.eval()(x), theirs(x))


def test_round_trip_is_bit_exact_and_fp16_storage_is_optional(saved, tmp_path: Path, random_base: MnistMLP) -> None:
    model, _, folder = saved
    loaded = LoraModel(copy.deepcopy(random_base))
    load_adapter(loaded, folder)
    for k, v in model.lora_state_dict().items():
        assert torch.equal(v, loaded.lora_state_dict()[k])
    save_adapter(model, tmp_path / "half", dtype=torch.float16)
    half = read_adapter(tmp_path / "half")
    assert (tmp_path / "half" / ADAPTER_WEIGHTS_NAME).stat().st_size < (folder / ADAPTER_WEIGHTS_NAME).stat().st_size * 0.6
    for k, v in model.lora_state_dict().items():
        torch.testing.assert_close(half.state_dict[k], v, rtol=1e-3, atol=1e-4)  # fp16 has 11 bits of mantissa


def _rewrite(folder: Path, fn) -> None:
    path = folder / ADAPTER_WEIGHTS_NAME
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata=meta)


def _assert_unchanged_after_failure(model: LoraModel, before: dict) -> None:
    assert list(model.peft_config) == ["x"] or model.peft_config == {}
    after = {k: v for k, v in model.state_dict().items()}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize(
    ("mutate", "error", "named"),
    [
        (lambda t: t.pop("base_model.model.linear2.lora_B.weight"), AdapterKeyError, "linear2.lora_B.weight"),
        (lambda t: t.update({"base_model.model.linear9.lora_A.weight": torch.zeros(4, 4)}), AdapterKeyError, "linear9.lora_A.weight"),
        (lambda t: t.update({"base_model.model.linear1.lora_A.weight": torch.zeros(4, 783)}), AdapterShapeError, "linear1.lora_A.weight"),
    ],
    ids=["missing-key", "unexpected-key", "wrong-shape"],
)
def test_bad_weights_raise_named_errors_and_change_nothing(saved, random_base, mutate, error, named) -> None:
    _, _, folder = saved
    _rewrite(folder, mutate)
    model = LoraModel(copy.deepcopy(random_base))
    before = dict(model.state_dict())
    with pytest.raises(error) as err:
        load_adapter(model, folder)
    assert named in str(err.value) and err.value.key.endswith(named)
    _assert_unchanged_after_failure(model, before)


def test_wrong_rank_in_config_is_named(saved, random_base) -> None:
    _, _, folder = saved
    cfg = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    cfg["r"] = 8
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(AdapterShapeError, match=r"linear\d.lora_[AB].weight.*r=8"):
        load_adapter(LoraModel(copy.deepcopy(random_base)), folder)


def test_unsupported_peft_features_are_refused_not_ignored(saved, random_base) -> None:
    _, _, folder = saved
    cfg = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps({**cfg, "lora_bias": True}))
    with pytest.raises(AdapterConfigError, match="lora_bias"):
        read_adapter(folder)


def test_a_lora_file_relabelled_dora_is_refused_naming_the_missing_magnitude_vector(saved, random_base) -> None:
    _, _, folder = saved
    cfg = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps({**cfg, "use_dora": True}))
    files = read_adapter(folder)  # a DoRA config now: its tensors must carry the magnitude vectors
    assert files.config.use_dora is True
    model = LoraModel(copy.deepcopy(random_base))
    with pytest.raises(AdapterKeyError, match="lora_magnitude_vector"):
        load_adapter(model, files)
    assert not model.peft_config


def test_fingerprint_mismatch_is_refused_unless_forced(saved) -> None:
    _, _, folder = saved
    torch.manual_seed(99)
    other = MnistMLP()
    model = LoraModel(copy.deepcopy(other))
    before = dict(model.state_dict())
    with pytest.raises(FingerprintMismatchError, match="force"):
        load_adapter(model, folder)
    _assert_unchanged_after_failure(model, before)
    load_adapter(model, folder, force=True)
    assert "default" in model.peft_config


def test_load_stack_names_and_weights(saved, random_base, tmp_path) -> None:
    _model, _, folder = saved
    stack = load_stack(copy.deepcopy(random_base), [folder, folder], [1.0, 0.5])
    assert stack.active_adapters == ["adapter", "adapter_"]
    assert stack.adapter_weights == {"adapter": 1.0, "adapter_": 0.5}
    with pytest.raises(AdapterConfigError, match="one --weight per --adapter"):
        load_stack(copy.deepcopy(random_base), [folder], [1.0, 2.0])


def test_missing_folder_is_a_file_not_found_error(tmp_path, random_base) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_adapter(tmp_path / "nope")


def test_configs_parsed_once_by_their_bytes_are_still_each_callers_own(saved, monkeypatch) -> None:
    """Loading many adapters of one recipe parses their (identical) config bytes once; each call
    still gets its own object, and a config that warns, or fails, is parsed (and warns) every time."""
    from mnist_peft.io import adapters

    monkeypatch.setattr(adapters, "_PARSED_CONFIGS", {})
    _, _, folder = saved
    first = read_adapter(folder).config
    first.target_modules.append("linear9")
    first.r = 99
    second = read_adapter(folder).config
    assert second.r == 4 and second.target_modules == ["linear1", "linear2", "linear3"] and second is not first
    assert len(adapters._PARSED_CONFIGS) == 1

    cfg = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    cfg["brand_new_peft_field"] = "on"  # unknown to us: warned about on every read
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    for _ in range(2):
        with pytest.warns(UserWarning, match="brand_new_peft_field"):
            read_adapter(folder)
    cfg.pop("brand_new_peft_field")
    cfg["use_rslora"] = "false"  # a string: refused on every read
    (folder / ADAPTER_CONFIG_NAME).write_text(json.dumps(cfg))
    for _ in range(2):
        with pytest.raises(AdapterConfigError, match="use_rslora"):
            read_adapter(folder)
    assert len(adapters._PARSED_CONFIGS) == 1

    monkeypatch.setattr(adapters, "_PARSED_CONFIGS_MAX", 3)
    for r in (1, 2, 3, 5, 6):
        cfg["use_rslora"], cfg["r"] = False, r
        raw = json.dumps(cfg).encode()
        assert adapters._config_from_bytes(raw, "x").r == r
    assert len(adapters._PARSED_CONFIGS) == 3  # bounded: the oldest go

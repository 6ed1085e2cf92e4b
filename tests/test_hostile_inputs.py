"""Files and numbers from outside: checked before anything is allocated, guessed or changed."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import run_cli
from safetensors.torch import save_file

from mnist_peft.errors import (
    AdapterConfigError,
    AdapterKeyError,
    AdapterStateError,
    ConfigMismatchError,
    CorruptFileError,
    ModelLoadError,
    ModelNotFoundError,
    NonFiniteError,
    TrainConfigError,
)
from mnist_peft.io.adapters import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, KEY_PREFIX, load_adapter, read_adapter, save_adapter
from mnist_peft.model.mlp import MnistMLP, load_base
from mnist_peft.training.loop import TrainConfig
from mnist_peft.training.recipes import AdapterRecipe
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel
from mnist_peft.tuners.lora.state_dict import check_lora_state_dict


@pytest.fixture()
def adapter_dir(random_base: MnistMLP, tmp_path):
    torch.manual_seed(1)
    model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    return save_adapter(model, tmp_path / "adapter")


def _state(model: LoraModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_adapter_file_with_non_finite_values_is_refused_and_the_model_is_unchanged(random_base, adapter_dir, bad) -> None:
    path = adapter_dir / ADAPTER_WEIGHTS_NAME
    files = read_adapter(adapter_dir)
    tensors = {KEY_PREFIX + k: v.clone() for k, v in files.state_dict.items()}
    tensors[KEY_PREFIX + "linear2.lora_B.weight"][3, 1] = bad
    save_file(tensors, path, metadata=files.metadata)
    model = LoraModel(copy.deepcopy(random_base))
    before = _state(model)
    with pytest.raises(NonFiniteError, match=r"linear2\.lora_B\.weight.*NaN or Inf"):
        load_adapter(model, adapter_dir, "x")
    assert model.peft_config == {} and before.keys() == _state(model).keys()


def test_two_tensors_for_one_key_are_refused(adapter_dir) -> None:
    files = read_adapter(adapter_dir)
    tensors = {KEY_PREFIX + k: v for k, v in files.state_dict.items()}
    tensors[KEY_PREFIX + "linear1.lora_A.default.weight"] = torch.zeros_like(files.state_dict["linear1.lora_A.weight"])
    save_file(tensors, adapter_dir / ADAPTER_WEIGHTS_NAME)
    with pytest.raises(AdapterKeyError, match=r"two tensors for 'linear1\.lora_A\.weight'"):
        read_adapter(adapter_dir)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("use_rslora", "false"),
        ("r", "4"),
        ("r", 2.0),
        ("lora_alpha", "8"),
        ("lora_alpha", float("inf")),
        ("lora_dropout", float("nan")),
        ("target_modules", [1, 2]),
        ("init_lora_weights", 1),
    ],
)
def test_config_fields_are_type_checked(adapter_dir, field, value) -> None:
    path = adapter_dir / ADAPTER_CONFIG_NAME
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterConfigError, match=field):
        read_adapter(adapter_dir)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_stack_weights_alpha_and_lr_are_named_errors(random_base, bad) -> None:
    model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=2))
    with pytest.raises(AdapterConfigError, match="stack weight of 'default' must be finite"):
        model.set_adapter(["default"], [bad])
    assert model.adapter_weights == {"default": 1.0}
    with pytest.raises(AdapterConfigError, match="lora_alpha must be finite"):
        LoraConfig(lora_alpha=bad)
    with pytest.raises(TrainConfigError, match="lr must be a finite number"):
        TrainConfig(lr=bad)
    with pytest.raises(TrainConfigError, match="lr must be a finite number"):
        AdapterRecipe(lr=bad)
    assert not math.isfinite(bad)


def test_cli_refuses_a_non_finite_weight(tmp_path) -> None:
    result = run_cli("eval", "--base", "base", "--adapter", "digit-3", "--weight", "nan", "--json")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "finite" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_repeated_adapter_name_in_a_stack_is_refused(random_base) -> None:
    model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=2))
    with pytest.raises(AdapterStateError, match="repeat"):
        model.set_adapter(["default", "default"])


def test_an_edited_base_config_is_refused_before_allocating(random_base, tmp_path, monkeypatch) -> None:
    random_base.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size_1"] = 400_000  # would be a 4.7 GB model
    (tmp_path / "config.json").write_text(json.dumps(config))

    def no_allocation(*args, **kwargs):
        raise AssertionError("the model was constructed before the config was checked")

    monkeypatch.setattr(MnistMLP, "__init__", no_allocation)
    with pytest.raises(ConfigMismatchError, match=r"does not match model.safetensors \(linear1.bias: file \(1000,\) vs config \(400000,\)"):
        load_base(tmp_path)
    config["hidden_size_1"] = "1000"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigMismatchError, match="hidden_size_1='1000' must be a positive integer"):
        load_base(tmp_path)


def test_argparse_usage_errors_are_one_line_with_exit_2() -> None:
    for args in (["eval", "--bogus"], ["no-such-command"], ["train-adapter", "--digit", "x"]):
        result = run_cli(*args)
        assert result.returncode == 2, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], result.stderr


def test_load_errors_say_whether_the_file_is_missing_or_corrupt(random_base, adapter_dir, tmp_path) -> None:
    with pytest.raises(ModelNotFoundError) as missing:
        read_adapter(tmp_path / "nowhere")
    assert isinstance(missing.value, FileNotFoundError) and isinstance(missing.value, ModelLoadError)
    (adapter_dir / ADAPTER_WEIGHTS_NAME).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken!")
    with pytest.raises(CorruptFileError, match="not a readable safetensors file") as corrupt:
        read_adapter(adapter_dir)
    assert not isinstance(corrupt.value, FileNotFoundError)
    random_base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "model.safetensors").write_bytes(b"\x02\x00")
    with pytest.raises(CorruptFileError, match="shorter than 8 bytes"):
        load_base(tmp_path / "base")


def test_large_finite_values_whose_sum_overflows_are_not_called_nan(random_base, adapter_dir) -> None:
    """The finiteness check sums all values first; an overflowing sum of finite weights must not be
    reported as "NaN or Inf". Such an adapter is refused by the probe instead: its outputs overflow."""
    files = read_adapter(adapter_dir)
    tensors = {KEY_PREFIX + k: torch.full_like(v, 3.0e38) for k, v in files.state_dict.items()}
    save_file(tensors, adapter_dir / ADAPTER_WEIGHTS_NAME, metadata=files.metadata)
    assert not torch.cat([t.reshape(-1) for t in tensors.values()]).sum().isfinite()  # the fast check alone would refuse
    model = LoraModel(copy.deepcopy(random_base))
    loaded = read_adapter(adapter_dir)
    check_lora_state_dict(model.model, loaded.config, loaded.state_dict)  # keys, shapes and finiteness pass
    with pytest.raises(NonFiniteError, match=r"layer 'linear\d' .*probe batch") as info:
        load_adapter(model, adapter_dir, "x")
    assert "NaN or Inf" not in str(info.value)


@pytest.mark.parametrize("name", ["keys", "training", "update", "forward", "_keys", "_parameters", "__base__", "a.b", ""])
def test_adapter_names_that_would_replace_an_attribute_are_refused_before_any_change(random_base, name) -> None:
    """A name like 'training' or '_keys' used to replace the layer's own attribute and break it."""
    model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=2))
    before = _state(model)
    with pytest.raises(AdapterStateError, match="is not allowed"):
        model.add_adapter(name, LoraConfig(r=2))
    assert list(model.peft_config) == ["default"] and before.keys() == _state(model).keys()
    model.add_adapter("keys-ok", LoraConfig(r=2))  # the layers still work
    assert all(layer.training is model.training for layer in model._layers())


def test_load_stack_renames_a_folder_whose_name_cannot_name_an_adapter(random_base, adapter_dir, tmp_path) -> None:
    from mnist_peft.io.adapters import load_stack

    folder = adapter_dir.rename(tmp_path / "keys")
    model = load_stack(copy.deepcopy(random_base), [folder])
    assert model.active_adapters == ["keys-adapter"]


def test_a_fifo_planted_as_the_weights_file_is_refused_without_blocking(adapter_dir) -> None:
    import os
    import threading

    (adapter_dir / ADAPTER_WEIGHTS_NAME).unlink()
    os.mkfifo(adapter_dir / ADAPTER_WEIGHTS_NAME)  # opening it for reading would wait for a writer forever
    raised: list[BaseException] = []

    def read() -> None:
        try:
            read_adapter(adapter_dir)
        except BaseException as exc:
            raised.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(20)
    assert not reader.is_alive(), "read_adapter blocked on a FIFO"
    assert len(raised) == 1 and isinstance(raised[0], ModelNotFoundError), raised
    assert "cannot be read" in str(raised[0]) and "regular file" in str(raised[0])


def test_values_that_overflow_the_models_dtype_are_refused(random_base, adapter_dir) -> None:
    """A float64 file with 1e300 passes the finiteness check but would be Inf in a float32 model."""
    files = read_adapter(adapter_dir)
    tensors = {KEY_PREFIX + k: v.double() for k, v in files.state_dict.items()}
    tensors[KEY_PREFIX + "linear3.lora_A.weight"][0, 0] = 1e300
    save_file(tensors, adapter_dir / ADAPTER_WEIGHTS_NAME, metadata=files.metadata)
    model = LoraModel(copy.deepcopy(random_base))
    with pytest.raises(NonFiniteError, match=r"linear3\.lora_A\.weight.*beyond torch.float32's range"):
        load_adapter(model, adapter_dir, "x")
    assert model.peft_config == {}


@pytest.mark.parametrize("dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
def test_float8_adapter_files_load_widened(random_base, adapter_dir, dtype) -> None:
    files = read_adapter(adapter_dir)
    tensors = {KEY_PREFIX + k: v.to(dtype) for k, v in files.state_dict.items()}
    save_file(tensors, adapter_dir / ADAPTER_WEIGHTS_NAME, metadata=files.metadata)
    model = LoraModel(copy.deepcopy(random_base))
    load_adapter(model, adapter_dir, "x")
    assert torch.equal(model.lora_state_dict("x")["linear2.lora_B.weight"], tensors[KEY_PREFIX + "linear2.lora_B.weight"].float())


def test_inject_adapter_refuses_a_bad_name_before_wrapping_anything(random_base) -> None:
    from torch import nn

    from mnist_peft.tuners.lora.model import inject_adapter

    net = copy.deepcopy(random_base)
    for name in ("a.b", "", "keys"):
        with pytest.raises(AdapterStateError, match="not allowed"):
            inject_adapter(net, LoraConfig(r=2), name)
        assert all(type(m) is nn.Linear for m in (net.linear1, net.linear2, net.linear3))

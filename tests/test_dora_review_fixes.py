"""What an adversarial read of the DoRA change found, each with a test that failed before its fix:
merging part of a stack with DoRA in play changed what the model computes; a DoRA adapter whose row
norm ``||W + s B A||`` is zero passed every check and answered NaN; magnitude vectors in a file that
says ``use_dora: false`` slipped into the registry; ``verify``'s torch-free probe missed magnitudes
stored under peft's live key form."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from mnist_peft.errors import AdapterConfigError, AdapterStateError, CorruptFileError, NonFiniteError
from mnist_peft.io.adapters import read_adapter, save_adapter
from mnist_peft.io.probe import probe_adapter_bytes
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.tuners.dora.config import DoraConfig
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel
from mnist_peft.tuners.lora.targets import lora_layers

SIZES = {"in_features": 20, "hidden_size_1": 32, "hidden_size_2": 24, "num_classes": 10}


def _model() -> LoraModel:
    torch.manual_seed(0)
    model = LoraModel(MnistMLP(**SIZES).double().eval())
    model.add_adapter("l", LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    model.add_adapter("a", DoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    with torch.no_grad():
        for _, layer in lora_layers(model.model):
            layer.lora_magnitude_vector["a"].mul_(1.3)
    return model


def test_merging_part_of_a_stack_with_dora_in_play_is_refused_and_changes_nothing() -> None:
    model = _model()
    model.set_adapter(["l", "a"])
    x = torch.rand(6, SIZES["in_features"], dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterStateError, match="in order"):
        model.merge(["a"])  # out of stack order: a's term rescales l's
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and not model.merged_adapters
    model.merge(["l"])  # a prefix: allowed, and the model computes what it did
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=0, atol=1e-12)
    model.merge(["a"])
    with torch.no_grad():
        assert torch.allclose(model(x), before, rtol=0, atol=1e-12)


def test_a_dora_forward_takes_its_norm_from_the_unmerged_base_as_its_merge_does() -> None:
    model = _model()
    model.set_adapter(["l", "a"])
    x = torch.rand(6, SIZES["in_features"], dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        model.merge(["l"])  # l is in the live weight now; a's norm must still be of the base without it
        assert (model(x) - before).abs().max() <= 1e-12


def _zero_norm_adapter(tmp_path):
    torch.manual_seed(0)
    base = MnistMLP(**SIZES).eval()
    model = LoraModel(copy.deepcopy(base), DoraConfig(r=4, lora_alpha=4, target_modules=["linear3"], init_lora_weights=False))
    layer = model.model.linear3
    with torch.no_grad():  # W + s B A with row 0 cancelled: A[0] = W[0], B[0, 0] = -1 (s = 1), the rest of row 0 zero
        layer.lora_A["default"][0] = layer.base_layer.weight[0]
        layer.lora_B["default"][0] = 0.0
        layer.lora_B["default"][0, 0] = -1.0
    folder = tmp_path / "zero-norm"
    save_adapter(model, folder)
    return base, folder


def test_a_dora_adapter_that_zeroes_a_row_norm_is_refused_by_name_and_the_model_is_unchanged(tmp_path) -> None:
    base, folder = _zero_norm_adapter(tmp_path)
    files = read_adapter(folder)
    model = LoraModel(copy.deepcopy(base))
    model.add_adapter("keep", LoraConfig(r=1, lora_alpha=1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"row 0 of 'linear3'.*norm"):
        model.add_adapter("z", files.config, state_dict=files.state_dict, source=str(folder))
    assert list(model.peft_config) == ["keep"]
    assert state.keys() == model.state_dict().keys() and all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_fresh_dora_adapter_on_a_base_with_a_zero_row_is_refused() -> None:
    base = MnistMLP(**SIZES)
    with torch.no_grad():
        base.linear2.weight[3] = 0.0
    with pytest.raises(NonFiniteError, match="row 3 of 'linear2'"):
        LoraModel(base, DoraConfig(r=2, lora_alpha=2))


def _dora_files(tmp_path, *, use_dora, key_suffix="lora_magnitude_vector", magnitude=1.0):
    folder = tmp_path / f"f-{use_dora}-{key_suffix.replace('.', '_')}"
    folder.mkdir()
    r, n_in, n_out = 2, SIZES["hidden_size_2"], SIZES["num_classes"]
    tensors = {
        "base_model.model.linear3.lora_A.weight": torch.full((r, n_in), 0.01),
        "base_model.model.linear3.lora_B.weight": torch.full((n_out, r), 0.01),
        f"base_model.model.linear3.{key_suffix}": torch.full((n_out,), magnitude),
    }
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["linear3"], "use_dora": use_dora}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("use_dora", [False, None])
def test_magnitude_vectors_in_a_file_that_is_not_dora_are_refused_by_the_reader_and_the_probe(tmp_path, use_dora) -> None:
    folder = _dora_files(tmp_path, use_dora=use_dora)
    with pytest.raises(AdapterConfigError, match="use_dora: true"):
        read_adapter(folder)
    raw = (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()
    with pytest.raises(CorruptFileError, match="magnitude vectors"):
        probe_adapter_bytes(*raw, what="the entry")


def test_verifys_probe_bounds_magnitudes_stored_under_peft_live_key_form(tmp_path) -> None:
    folder = _dora_files(tmp_path, use_dora=True, key_suffix="lora_magnitude_vector.default.weight", magnitude=1e8)
    raw = (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()
    with pytest.raises(NonFiniteError, match="beyond"):
        probe_adapter_bytes(*raw, what="the entry")

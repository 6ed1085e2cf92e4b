"""Native LoRA: the equation, enable/disable, stacking, merge/unmerge, the fused path."""

from __future__ import annotations

import copy

import pytest
import torch

from mnist_peft.errors import AdapterConfigError, AdapterStateError, MergeError
from mnist_peft.io.peft_compat import FUSED_TOLERANCE
from mnist_peft.model.mlp import MnistMLP, count_parameters
from mnist_peft.tuners.lora.config import LoraConfig, compute_scaling
from mnist_peft.tuners.lora.layer import get_delta_weight
from mnist_peft.tuners.lora.model import LoraModel, set_forward_mode
from mnist_peft.tuners.lora.targets import lora_layers

# Merged and unmerged forwards sum the same terms in a different order (W x + B A x vs (W + B A) x):
# float32 rounding of activations of magnitude ~10 over 2,000-term dot products stays below this.
MERGED_VS_UNMERGED_TOLERANCE = 1e-4


def _nontrivial(base: MnistMLP, r: int = 4, alpha: float = 8, seed: int = 1, **kw) -> LoraModel:
    torch.manual_seed(seed)
    return LoraModel(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, **kw)).eval()


def _weights(model: LoraModel) -> dict[str, torch.Tensor]:
    return {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model.model)}


def test_forward_is_the_lora_equation(random_base: MnistMLP) -> None:
    model = _nontrivial(random_base)
    set_forward_mode(model, "exact")
    x = torch.randn(5, 784)
    layer = model.model.linear1
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + (x @ A.T @ B.T) * (8 / 4)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert layer.scaling["default"] == 2.0 and compute_scaling(4, 8, use_rslora=True) == 4.0


def test_seed_recipe_parameter_counts(random_base: MnistMLP) -> None:
    model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=1, lora_alpha=1, init_lora_weights="seed"))
    assert model.num_lora_parameters() == 6_794  # 1,784 + 3,000 + 2,010
    assert count_parameters(model) == 2_813_804
    assert count_parameters(random_base) == 2_807_010  # the bare base, counted
    assert round(100 * model.num_lora_parameters() / count_parameters(random_base), 3) == 0.242  # the seed's +0.242%
    assert count_parameters(model, trainable_only=True) == 6_794


def test_default_init_is_a_no_op_and_seed_init_draws_standard_normal_A(random_base: MnistMLP) -> None:
    x = torch.randn(8, 784)
    torch.manual_seed(0)
    model = LoraModel(copy.deepcopy(random_base), LoraConfig(r=4)).eval()
    assert torch.equal(model(x), random_base(x))
    torch.manual_seed(0)
    seed_init = LoraModel(copy.deepcopy(random_base), LoraConfig(r=64, target_modules=["linear2"], init_lora_weights="seed"))
    A = seed_init.model.linear2.lora_A["default"].detach()
    assert abs(float(A.mean())) < 0.01 and abs(float(A.std()) - 1) < 0.01
    assert not seed_init.model.linear2.lora_B["default"].any()


def test_disable_adapter_gives_back_the_base_exactly(random_base: MnistMLP) -> None:
    model = _nontrivial(random_base)
    x = torch.randn(16, 784)
    base_out = random_base(x)
    assert not torch.equal(model(x), base_out)  # the adapter does something
    with model.disable_adapter():
        assert torch.equal(model(x), base_out)
    model.merge()
    with model.disable_adapter():
        assert torch.equal(model(x), base_out)  # merged and switched off: still the base


def test_unmerge_restores_base_bit_exactly_over_1000_cycles(random_base: MnistMLP) -> None:
    model = _nontrivial(random_base, r=4, alpha=3)  # scaling 0.75: not a power of two
    before = _weights(model)
    for _ in range(1000):
        model.merge()
        model.unmerge()
    after = _weights(model)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_merge_is_idempotent_and_merged_equals_unmerged(random_base: MnistMLP) -> None:
    model = _nontrivial(random_base)
    x = torch.randn(32, 784)
    unmerged = model(x)
    model.merge()
    once = _weights(model)
    model.merge()
    assert all(torch.equal(once[n], w) for n, w in _weights(model).items())
    assert model.merged_adapters == ["default"]
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=MERGED_VS_UNMERGED_TOLERANCE)


def test_safe_merge_refuses_non_finite_and_leaves_the_model_untouched(random_base: MnistMLP) -> None:
    model = _nontrivial(random_base)
    before = _weights(model)
    with torch.no_grad():
        model.model.linear3.lora_B["default"][0, 0] = float("inf")
    with pytest.raises(MergeError, match="linear3"):
        model.merge(safe_merge=True)
    assert model.merged_adapters == []
    assert all(torch.equal(before[n], w) for n, w in _weights(model).items())


def test_merge_and_unload_returns_a_plain_model_that_saves(random_base: MnistMLP, tmp_path) -> None:
    model = _nontrivial(random_base)
    x = torch.randn(4, 784)
    expected = model(x)
    plain = model.merge_and_unload()
    assert type(plain) is MnistMLP and type(plain.linear1) is torch.nn.Linear
    plain.save_pretrained(tmp_path)
    loaded = MnistMLP.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=MERGED_VS_UNMERGED_TOLERANCE)


def test_stack_output_is_base_plus_weighted_sum_of_deltas(random_base: MnistMLP) -> None:
    model = _nontrivial(random_base, r=2, alpha=2)
    torch.manual_seed(7)
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=6, init_lora_weights=False))
    model.set_adapter(["default", "other"], [0.5, -1.5])
    set_forward_mode(model, "exact")
    x = torch.randn(8, 784)
    h = x
    for name in ("linear1", "linear2", "linear3"):
        layer = model.model.get_submodule(name)
        W = layer.base_layer.weight + 0.5 * get_delta_weight(layer.lora_A["default"], layer.lora_B["default"], 1.0)
        W = W - 1.5 * get_delta_weight(layer.lora_A["other"], layer.lora_B["other"], 2.0)
        h = h @ W.T + layer.base_layer.bias
        h = torch.relu(h) if name != "linear3" else h
    torch.testing.assert_close(model(x), h, rtol=0, atol=MERGED_VS_UNMERGED_TOLERANCE)
    before = _weights(model)
    model.merge()
    torch.testing.assert_close(model(x), h, rtol=0, atol=MERGED_VS_UNMERGED_TOLERANCE)
    model.unmerge()
    assert all(torch.equal(before[n], w) for n, w in _weights(model).items())


def test_fused_path_matches_exact_and_follows_every_change(random_base: MnistMLP) -> None:
    model = _nontrivial(random_base)
    torch.manual_seed(3)
    model.add_adapter("b", LoraConfig(r=2, lora_alpha=2, init_lora_weights=False))
    x = torch.randn(64, 784)

    def check() -> None:
        with torch.no_grad():
            fused = model(x)
            set_forward_mode(model, "exact")
            exact = model(x)
            set_forward_mode(model, "auto")
        torch.testing.assert_close(fused, exact, rtol=0, atol=FUSED_TOLERANCE)

    check()
    with torch.no_grad():
        model.model.linear2.lora_A["default"].mul_(3)  # in-place change of adapter weights
    check()
    with torch.no_grad():
        model.model.linear1.base_layer.weight.add_(0.01)  # in-place change of the base
    check()
    model.set_adapter(["default", "b"], [1.0, 0.25])  # active set and stack weights
    check()
    model.model.linear3.scaling["b"] = 5.0  # scaling
    check()
    model.set_adapter("b")
    check()


def test_add_delete_and_set_adapter_errors(random_base: MnistMLP) -> None:
    model = _nontrivial(random_base)
    with pytest.raises(AdapterStateError, match="already exists"):
        model.add_adapter("default", LoraConfig())
    with pytest.raises(AdapterStateError, match="no adapter named 'x'"):
        model.set_adapter("x")
    with pytest.raises(AdapterConfigError, match="linear9"):
        model.add_adapter("y", LoraConfig(target_modules=["linear9"]))
    assert "y" not in model.peft_config and "y" not in model.model.linear1.lora_A
    model.merge()
    with pytest.raises(AdapterStateError, match="unmerge"):
        model.delete_adapter("default")
    model.unmerge()
    model.delete_adapter("default")
    assert model.peft_config == {} and "default" not in model.model.linear1.lora_A


@pytest.mark.parametrize("bad", [{"r": 0}, {"lora_alpha": 0}, {"lora_dropout": 1.0}, {"init_lora_weights": "pissa"}, {"bias": "all"}])
def test_invalid_configs_are_refused(bad: dict) -> None:
    with pytest.raises(AdapterConfigError):
        LoraConfig(**bad)


def test_target_modules_are_sorted() -> None:
    assert LoraConfig(target_modules=["linear3", "linear1"]).target_modules == ["linear1", "linear3"]


def test_dotted_target_names_adapt_only_the_layer_they_name() -> None:
    """``target_modules`` entries match a module's whole name or a dotted suffix of it, as in peft."""
    from torch import nn

    from mnist_peft.tuners.lora.layer import LoraLinear

    net = nn.ModuleDict({"a": nn.ModuleDict({"linear1": nn.Linear(4, 3)}), "b": nn.ModuleDict({"linear1": nn.Linear(4, 3)})})
    model = LoraModel(net, LoraConfig(r=2, target_modules=["a.linear1"]))
    assert isinstance(net["a"]["linear1"], LoraLinear) and isinstance(net["b"]["linear1"], nn.Linear)
    assert sorted(model.lora_state_dict()) == ["a.linear1.lora_A.weight", "a.linear1.lora_B.weight"]
    both = LoraModel(
        nn.ModuleDict({"a": nn.ModuleDict({"linear1": nn.Linear(4, 3)}), "b": nn.Linear(4, 3)}),
        LoraConfig(r=2, target_modules=["linear1", "b"]),
    )
    assert sorted({k.split(".lora_")[0] for k in both.lora_state_dict()}) == ["a.linear1", "b"]
    with pytest.raises(AdapterConfigError, match=r"\['c.linear1'\] not found"):
        LoraModel(nn.ModuleDict({"a": nn.ModuleDict({"linear1": nn.Linear(4, 3)})}), LoraConfig(r=2, target_modules=["c.linear1"]))


def test_adapter_weights_dict_behaves_as_a_parameter_dict() -> None:
    """The fast item assignment keeps everything a ParameterDict promises."""
    from mnist_peft.tuners.lora.layer import _AdapterParameters

    d = _AdapterParameters()
    p = torch.nn.Parameter(torch.ones(2))
    d["x"] = p
    d["y"] = torch.zeros(3)  # a plain tensor is wrapped, as nn.ParameterDict does
    assert list(d) == ["x", "y"] and d["x"] is p and isinstance(d["y"], torch.nn.Parameter)
    assert [n for n, _ in d.named_parameters()] == ["x", "y"] and list(d.state_dict()) == ["x", "y"]
    del d["x"]
    assert list(d) == ["y"] and "x" not in dict(d.named_parameters())
    with pytest.raises(KeyError):
        d["keys"] = torch.nn.Parameter(torch.ones(1))  # falls back to nn.ParameterDict, which refuses it

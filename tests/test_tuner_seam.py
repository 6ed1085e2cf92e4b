"""The adapter-type seams.

- ``mnist_peft.tuners.base``: LoRA satisfies the protocols, and so does a second type written here
  (an IA3-like scaling of a layer's input), checked by the same contract.
- ``LoraVariant`` (``mnist_peft.tuners.lora.layer``), the per-adapter type of a LoRA layer that DoRA
  is: a second variant written here (a per-row gate on the LoRA update, with its own tensor, its own
  merge step) runs through the LoRA layer and model with no change to them: add, forward, stacks,
  state dict keys and loading, delete, merge/unmerge through the ledger, and a mixed batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.errors import AdapterShapeError, AdapterStateError
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.serving.forward import mixed_forward
from mnist_peft.tuners.base import AdapterConfig, AdapterLayer
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.layer import LoraLinear, LoraVariant
from mnist_peft.tuners.lora.model import LoraModel, set_forward_mode
from mnist_peft.tuners.lora.targets import lora_layers

ATOL = 1e-12
"""float64 throughout: a merged weight reorders the forward's sums, which moves results by ~1e-16."""


# ----------------------------------------------------------------------------- a second adapter type
@dataclass
class ToyIA3Config:
    """IA3 on a feed-forward layer's input: one learned vector l (in,) per adapter."""

    peft_type: ClassVar[str] = "IA3"
    target_modules: list[str] = field(default_factory=lambda: ["linear1"])
    init: float = 1.0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class ToyIA3Linear(nn.Module):
    """``y = (x * l) W^T + b``, i.e. the weight ``W diag(l)``; merge multiplies W's columns by l."""

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ia3_l = nn.ParameterDict()  # name -> (in,)
        self.active: list[str] = []
        self.merged_adapters: list[str] = []
        self._original: torch.Tensor | None = None

    @property
    def active_adapters(self) -> list[str]:
        return [n for n in self.active if n in self.ia3_l]

    def update_layer(self, adapter_name: str, config: ToyIA3Config, weights: torch.Tensor | None = None) -> None:
        w = self.base_layer.weight
        scale = torch.full((w.shape[1],), config.init, dtype=w.dtype) if weights is None else weights.to(w.dtype).clone()
        self.ia3_l[adapter_name] = nn.Parameter(scale)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged; unmerge first")
        del self.ia3_l[adapter_name]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        w = self.unmerged_weight()
        return w * self.ia3_l[adapter_name].detach() - w  # W diag(l) - W

    def merged_weight(self, adapter_names: list[str]) -> torch.Tensor:
        w = self.base_layer.weight.detach().clone()
        for n in adapter_names:
            w.mul_(self.ia3_l[n].detach())  # scales column j by l_j
        return w

    def commit_merge(self, adapter_names: list[str], new_weight: torch.Tensor) -> None:
        if self._original is None:
            self._original = self.base_layer.weight.detach()
        self.base_layer.weight.data = new_weight
        self.merged_adapters.extend(adapter_names)

    def unmerged_weight(self) -> torch.Tensor:
        return self.base_layer.weight.detach() if self._original is None else self._original

    def unmerge(self) -> None:
        if self._original is not None:
            self.base_layer.weight.data = self._original
            self._original = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for n in self.active_adapters:
            if n not in self.merged_adapters:
                x = x * self.ia3_l[n]
        return self.base_layer(x)


# ----------------------------------------------------------------------------- one contract, two types
def _base() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(8, 5, dtype=torch.float64)


def _check_layer_contract(layer: AdapterLayer, config: AdapterConfig, activate: Callable[[str], None], weights: object = None) -> None:
    """What a model relies on, checked through the protocol alone: the adapter changes the output
    by exactly its delta; merge is compute-then-commit; unmerge restores the base bit for bit."""
    assert isinstance(layer, AdapterLayer) and isinstance(config, AdapterConfig)
    base = layer.base_layer
    w0, bias = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(4, 8, dtype=torch.float64)
    layer.update_layer("a", config, weights)
    activate("a")
    assert layer.active_adapters == ["a"]
    y = layer(x)
    delta = layer.get_delta_weight("a")
    assert delta.shape == w0.shape and not torch.allclose(y, F.linear(x, w0, bias))  # the adapter does something
    torch.testing.assert_close(y, F.linear(x, w0 + delta, bias), rtol=0, atol=ATOL)

    new = layer.merged_weight(["a"])
    assert torch.equal(base.weight, w0)  # computing a merge changes nothing live
    torch.testing.assert_close(new, w0 + delta, rtol=0, atol=ATOL)
    layer.commit_merge(["a"], new)
    assert layer.merged_adapters == ["a"] and torch.equal(base.weight, new)
    assert torch.equal(layer.unmerged_weight(), w0)
    torch.testing.assert_close(layer(x), y, rtol=0, atol=ATOL)  # merged: the same function
    layer.unmerge()
    layer.unmerge()  # idempotent
    assert layer.merged_adapters == [] and torch.equal(base.weight, w0)

    layer.delete_adapter("a")
    assert layer.active_adapters == [] and torch.equal(layer(x), base(x))


def test_lora_config_and_layer_satisfy_the_adapter_protocols() -> None:
    assert isinstance(LoraConfig(), AdapterConfig) and LoraConfig.peft_type == "LORA"
    assert "peft_type" not in LoraConfig().to_dict()  # a class constant: adapter_config.json is written elsewhere
    assert isinstance(LoraLinear(nn.Linear(3, 2)), AdapterLayer)
    assert not isinstance(nn.Linear(3, 2), AdapterLayer) and not isinstance({"r": 8}, AdapterConfig)


def test_lora_layer_keeps_the_layer_contract() -> None:
    layer = LoraLinear(_base())
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["x"], init_lora_weights=False)  # B random: a real delta

    def activate(name: str) -> None:
        layer.state.active = [name]

    _check_layer_contract(layer, config, activate)


def test_a_second_adapter_type_keeps_the_layer_contract() -> None:
    layer = ToyIA3Linear(_base())
    assert isinstance(layer, AdapterLayer) and isinstance(ToyIA3Config(), AdapterConfig)
    _check_layer_contract(layer, ToyIA3Config(), lambda name: setattr(layer, "active", [name]), torch.linspace(0.5, 2.0, 8))


def test_the_second_type_computes_ia3() -> None:
    """Its own numerics, against the definition: y = (x * l) W^T + b, merged weight W diag(l)."""
    base = _base()
    layer = ToyIA3Linear(base)
    scale = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    layer.update_layer("a", ToyIA3Config(), scale)
    layer.active = ["a"]
    x = torch.randn(3, 8, dtype=torch.float64)
    expected = x @ (base.weight.detach() * scale).T + base.bias.detach()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(layer.merged_weight(["a"]), base.weight.detach() @ torch.diag(scale), rtol=0, atol=ATOL)
    layer.commit_merge(["a"], layer.merged_weight(["a"]))
    with pytest.raises(ValueError, match="merged"):
        layer.delete_adapter("a")


# ----------------------------------------------------------------------------- a second LoRA variant
# DoRA is one LoraVariant; a seam is real when a second one uses it. The toy below gates each output
# row of the LoRA update by a learned vector g (out,): y = x W^T + b + w * g * s (x A^T) B^T, merged
# weight W + w s diag(g) B A. It touches no LoRA code: its config names it, the layer hands it every
# per-adapter step, and the merge ledger takes its own MergeStep.
GATE_KEY = "lora_gate"


@dataclass(frozen=True)
class GatedDelta:
    """The gated variant's merge step: ``W + diag(g) (s B A)``, deterministic (the ledger replays it)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    gate: torch.Tensor  # (out,)

    def merge_into(self, out: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        d = (
            torch.matmul(self.B, self.A, out=torch.empty_like(out) if delta is None else delta)
            .mul_(self.scaling)
            .mul_(self.gate.view(-1, 1))
        )
        return torch.add(weight, d, out=out) if delta is None else out.add_(d)

    def kept(self) -> GatedDelta:
        return GatedDelta(self.A.clone(), self.B.clone(), self.scaling, self.gate.clone())


def _gates(layer: LoraLinear) -> nn.ParameterDict:
    if GATE_KEY not in layer._modules:
        layer.add_module(GATE_KEY, nn.ParameterDict())
    return layer._modules[GATE_KEY]  # type: ignore[return-value]


class GatedVariant(LoraVariant):
    name = "gated"
    fusable = False
    extra_keys = (GATE_KEY,)

    def init(self, layer, adapter_name, weights) -> None:
        w = layer.base_layer.weight
        g = layer.own_copy(weights[GATE_KEY]) if weights is not None else torch.linspace(0.5, 1.5, layer.out_features, dtype=w.dtype)
        _gates(layer)[adapter_name] = nn.Parameter(g)

    def extra_shapes(self, out_features, in_features):
        return {GATE_KEY: (out_features,)}

    def parameters(self, layer, adapter_name):
        return {GATE_KEY: _gates(layer)[adapter_name]}

    def delete(self, layer, adapter_name) -> None:
        gates = _gates(layer)
        if adapter_name in gates:
            del gates[adapter_name]

    def forward(self, layer, adapter_name, x, result, exact):
        g = _gates(layer)[adapter_name]
        return result + g * F.linear(F.linear(x, layer.lora_A[adapter_name]), layer.lora_B[adapter_name]) * layer.effective_scaling(
            adapter_name
        )

    def mixed_block_(self, layer, adapter_name, result, rows, exact) -> None:
        g = _gates(layer)[adapter_name]
        result += g * F.linear(F.linear(rows, layer.lora_A[adapter_name]), layer.lora_B[adapter_name]) * layer.scaling[adapter_name]

    def merge_step(self, layer, adapter_name) -> GatedDelta:
        A, B = layer.lora_A[adapter_name].detach(), layer.lora_B[adapter_name].detach()
        return GatedDelta(A, B, layer.effective_scaling(adapter_name), _gates(layer)[adapter_name].detach())

    def delta_weight(self, layer, adapter_name) -> torch.Tensor:
        A, B, g = layer.lora_A[adapter_name], layer.lora_B[adapter_name], _gates(layer)[adapter_name]
        return g.view(-1, 1) * (B @ A) * layer.scaling[adapter_name]


GATED = GatedVariant()


@dataclass
class GatedConfig(LoraConfig):
    adapter_type: ClassVar[str] = "gated"

    def layer_variant(self) -> LoraVariant:
        return GATED


SMALL = {"in_features": 8, "hidden_size_1": 6, "hidden_size_2": 5, "num_classes": 3}


def _gated_model() -> LoraModel:
    torch.manual_seed(0)
    model = LoraModel(MnistMLP(**SMALL).double()).eval()
    model.add_adapter("g", GatedConfig(r=2, lora_alpha=4, init_lora_weights=False))
    model.add_adapter("plain", LoraConfig(r=3, lora_alpha=3, target_modules=["linear2"], init_lora_weights=False))
    with torch.no_grad():  # gates apart from one another, as after training
        for _, layer in lora_layers(model.model):
            layer.lora_gate["g"].uniform_(-2.0, 2.0)
    return model


def _gated_reference(model: LoraModel, x: torch.Tensor, names: list[str], weights: dict[str, float], *, gates: bool = True) -> torch.Tensor:
    """The definition, written out: each layer's base output plus, per active adapter it holds,
    ``w s (x A^T B^T)``, gated per row by g for the gated one (``gates=False``: as plain LoRA)."""
    h = x
    for lname in ("linear1", "linear2", "linear3"):
        layer = model.model.get_submodule(lname)
        out = h @ layer.base_layer.weight.T + layer.base_layer.bias
        for n in names:
            if n in layer.lora_A:
                update = weights.get(n, 1.0) * layer.scaling[n] * (h @ layer.lora_A[n].T @ layer.lora_B[n].T)
                out = out + (layer.lora_gate[n] * update if gates and n in layer.lora_gate else update)
        h = torch.relu(out) if lname != "linear3" else out
    return h


def test_a_second_lora_variant_keeps_the_layer_contract() -> None:
    layer = LoraLinear(_base())
    _check_layer_contract(
        layer, GatedConfig(r=2, lora_alpha=4, target_modules=["x"], init_lora_weights=False), lambda n: setattr(layer.state, "active", [n])
    )
    assert "a" not in layer.lora_gate and "a" not in layer.variants  # delete dropped its own tensor too


def test_the_lora_model_adds_runs_and_stacks_the_gated_variant_unchanged() -> None:
    model = _gated_model()
    assert {type(layer.variants["g"]) for _, layer in lora_layers(model.model)} == {GatedVariant}
    x = torch.randn(5, 8, dtype=torch.float64)
    for names, weights in ((["g"], None), (["plain", "g"], [0.5, -1.5])):
        model.set_adapter(names, weights)
        expected = _gated_reference(model, x, names, model.adapter_weights)
        for mode in ("auto", "exact"):
            set_forward_mode(model, mode)
            with torch.no_grad():
                torch.testing.assert_close(model(x), expected, rtol=0, atol=ATOL)
        set_forward_mode(model, "auto")
        with torch.no_grad():  # the gates matter: as plain LoRA the output is another one
            assert (_gated_reference(model, x, names, model.adapter_weights, gates=False) - expected).abs().max() > 1e-3
    loss = model(x).square().sum()  # trainable: the gate gets a gradient like A and B
    loss.backward()
    assert all(layer.lora_gate["g"].grad is not None and layer.lora_gate["g"].grad.abs().sum() > 0 for _, layer in lora_layers(model.model))


def test_the_gated_variants_state_dict_carries_its_extra_key_and_loads_back() -> None:
    model = _gated_model()
    state = model.lora_state_dict("g")
    assert sorted(state) == sorted(f"linear{i}.{k}" for i in (1, 2, 3) for k in ("lora_A.weight", "lora_B.weight", GATE_KEY))
    other = LoraModel(MnistMLP(**SMALL).double()).eval()
    other.model.load_state_dict(model.base_state_dict())
    other.add_adapter("g", model.peft_config["g"], state_dict=state)
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        model.set_adapter("g")
        assert torch.equal(other(x), model(x))
    bad = {**state, f"linear2.{GATE_KEY}": torch.ones(7, dtype=torch.float64)}
    with pytest.raises(AdapterShapeError, match=f"linear2.{GATE_KEY}"):  # the layer's checks know the variant's shapes
        other.add_adapter("h", model.peft_config["g"], state_dict=bad)
    assert "h" not in other.peft_config and all("h" not in layer.lora_A for _, layer in lora_layers(other.model))


def test_merge_and_unmerge_of_the_gated_variant_go_through_the_ledger_bit_exactly() -> None:
    model = _gated_model()
    model.set_adapter(["g", "plain"], [1.0, 0.5])
    x = torch.randn(5, 8, dtype=torch.float64)
    with torch.no_grad():
        unmerged = model(x)
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model.model)}
    steps = {
        n: [layer.variants[a].merge_step(layer, a) for a in ("g", "plain") if a in layer.lora_A] for n, layer in lora_layers(model.model)
    }
    model.merge()
    for lname, layer in lora_layers(model.model):
        expected = originals[lname].clone()
        for step in steps[lname]:  # the steps as the ledger applies them: the first out of place, the rest in place
            expected = (
                step.merge_into(torch.empty_like(expected), expected, None)
                if step is steps[lname][0]
                else step.merge_into(expected, expected, torch.empty_like(expected))
            )
        assert torch.equal(layer.base_layer.weight, expected)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=ATOL)
    with pytest.raises(AdapterStateError, match="unmerge"):
        model.delete_adapter("g")
    layer = model.model.linear2
    with torch.no_grad():
        layer.base_layer.weight.data[0, 0] += 0.25  # an edit while merged: the ledger replays GatedDelta to find it
    model.unmerge()
    edited = originals["linear2"].clone()
    edited[0, 0] += 0.25
    torch.testing.assert_close(layer.base_layer.weight, edited, rtol=0, atol=ATOL)
    assert torch.equal(layer.base_layer.weight.flatten()[1:], originals["linear2"].flatten()[1:])  # untouched entries: their bits
    assert all(torch.equal(model.model.get_submodule(n).base_layer.weight, originals[n]) for n in ("linear1", "linear3"))
    model.delete_adapter("g")
    assert all("g" not in layer.lora_gate and "g" not in layer.variants for _, layer in lora_layers(model.model))


def test_a_mixed_batch_runs_the_gated_variants_block_beside_lora_and_base_rows() -> None:
    model = _gated_model()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(7, 8, dtype=torch.float64)
    rows = ["g", None, "plain", "g", "plain", None, "g"]
    y = mixed_forward(model, x, rows)
    for i, name in enumerate(rows):
        expected = _gated_reference(model, x[i : i + 1], [] if name is None else [name], {})
        torch.testing.assert_close(y[i : i + 1], expected, rtol=0, atol=ATOL)
    with torch.no_grad():  # the gated rows ran the variant: not the base, not plain LoRA
        assert (y[0] - _gated_reference(model, x[:1], [], {})[0]).abs().max() > 1e-3
        assert (y[0] - _gated_reference(model, x[:1], ["g"], {}, gates=False)[0]).abs().max() > 1e-3

"""The adapter-type seam (``mnist_peft.tuners.base``): LoRA satisfies the protocols, and so does a
second type written here (an IA3-like scaling of a layer's input), checked by the same contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.tuners.base import AdapterConfig, AdapterLayer
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.layer import LoraLinear

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

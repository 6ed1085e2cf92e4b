"""The native LoRA: ``config`` (LoraConfig, scaling), ``layer`` (LoraLinear and the LoRA math),
``model`` (LoraModel, injection), ``targets`` (which modules are adapted), ``state_dict`` (weights
checked before they load), ``ledger`` (merge and bit-exact unmerge) and ``fused`` (the inference
fast path, handed weights, not the layer). ``ledger`` and ``fused`` assume ``W + s*B@A``: LoRA-only."""

from __future__ import annotations

from .config import BASE_ADAPTER, LoraConfig, compute_scaling
from .layer import LoraLinear, get_delta_weight
from .model import LoraModel
from .targets import lora_layers

__all__ = [
    "BASE_ADAPTER",
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "compute_scaling",
    "get_delta_weight",
    "lora_layers",
]

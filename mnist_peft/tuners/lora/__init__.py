"""The native LoRA: config, layer, model, the merge ledger (bit-exact unmerge) and the fused inference path."""

from __future__ import annotations

from .layer import BASE_ADAPTER, LoraConfig, LoraLinear, LoraModel, compute_scaling, get_delta_weight, lora_layers

__all__ = [
    "BASE_ADAPTER",
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "compute_scaling",
    "get_delta_weight",
    "lora_layers",
]

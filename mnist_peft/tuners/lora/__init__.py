"""The native LoRA: ``config`` (LoraConfig, scaling), ``layer`` (LoraLinear and the LoRA math),
``model`` (LoraModel, injection), ``targets`` (which modules are adapted), ``state_dict`` (weights
checked before they load), ``ledger`` (merge and bit-exact unmerge) and ``fused`` (the inference
fast path, handed weights, not the layer). ``ledger`` and ``fused`` assume ``W + s*B@A``: LoRA-only.

The names below resolve on first use (PEP 562): ``config`` is plain Python, and a torch-free reader
(``io.probe``, used by ``registry verify``) imports it without importing torch."""

from __future__ import annotations

from mnist_peft.lazy import lazy_names

__all__ = [
    "BASE_ADAPTER",
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "compute_scaling",
    "get_delta_weight",
    "lora_layers",
]

_HOMES = {
    "BASE_ADAPTER": "config",
    "LoraConfig": "config",
    "compute_scaling": "config",
    "LoraLinear": "layer",
    "get_delta_weight": "layer",
    "LoraModel": "model",
    "lora_layers": "targets",
}


__getattr__, __dir__ = lazy_names(__name__, _HOMES, globals())

"""The native LoRA: ``config`` (LoraConfig, scaling), ``layer`` (LoraLinear and the LoRA math),
``model`` (LoraModel, injection), ``targets`` (which modules are adapted), ``state_dict`` (weights
checked before they load), ``ledger`` (merge and bit-exact unmerge) and ``fused`` (the inference
fast path, handed weights, not the layer). ``ledger`` and ``fused`` assume ``W + s*B@A``: LoRA-only.

The names below resolve on first use (PEP 562): ``config`` is plain Python, and a torch-free reader
(``io.probe``, used by ``registry verify``) imports it without importing torch."""

from __future__ import annotations

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


def __getattr__(name: str) -> object:
    import importlib

    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

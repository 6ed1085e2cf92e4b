"""LoRA weights as state dicts (``<module>.lora_A.weight`` / ``.lora_B.weight``): taken from a
model, and checked against a model before anything is loaded (keys, shapes, dtypes, finiteness,
values that would overflow the model's dtype). Adding an adapter with a ``state_dict`` runs these
checks first, so nothing changes when they fail."""

from __future__ import annotations

import math

import torch
from torch import nn

from mnist_peft.errors import AdapterKeyError, AdapterShapeError, NonFiniteError

from .config import LoraConfig
from .layer import LoraLinear
from .targets import find_targets, lora_layers

__all__ = ["adapter_state_dict", "base_state_dict", "check_lora_state_dict", "check_fits_dtypes"]


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)}`` of one adapter, copied."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            # Copies: lora_A is a view into the fused buffers, which hold the base weight and
            # the other adapters too (torch.save of a view writes its whole storage).
            out[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].detach().clone()
            out[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].detach().clone()
    return out


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The bare base's tensors of ``model`` (with LoRA layers) under their plain names, with unmerged weights."""
    state = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    for name, layer in lora_layers(model):
        state[f"{name}.weight"] = layer.unmerged_weight()
    return state


def check_lora_state_dict(
    model: nn.Module,
    config: LoraConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    path: str | None = None,
    targets: dict[str, tuple[int, int]] | None = None,
) -> None:
    """Check ``state_dict`` (keys ``<module>.lora_A.weight`` / ``.lora_B.weight``) against the model.

    Raises:
        AdapterKeyError: a key is missing or unexpected (named in the message and as ``.key``).
        AdapterShapeError: a tensor has the wrong shape, e.g. a rank other than ``config.r``.
        NonFiniteError: a tensor holds NaN or Inf.
    """
    _check_keys(config, state_dict, find_targets(model, config) if targets is None else targets, path)
    if state_dict:
        _check_values_finite(torch.cat([t.reshape(-1) for t in state_dict.values()]), state_dict, path)


def _check_keys(config: LoraConfig, state_dict: dict[str, torch.Tensor], targets: dict[str, tuple[int, int]], path: str | None) -> None:
    where = f" in {path!r}" if path else ""
    expected: dict[str, tuple[int, int]] = {}
    for name, (out_f, in_f) in targets.items():
        expected[f"{name}.lora_A.weight"] = (config.r, in_f)
        expected[f"{name}.lora_B.weight"] = (out_f, config.r)
    for key in expected:
        if key not in state_dict:
            raise AdapterKeyError(
                f"adapter weights{where} lack key {key!r} required by target_modules {config.target_modules}", key=key, path=path
            )
    for key, tensor in state_dict.items():
        if key not in expected:
            raise AdapterKeyError(
                f"unexpected key {key!r}{where}: it matches no target module {config.target_modules} of the model", key=key, path=path
            )
        if tensor.shape != expected[key]:  # torch.Size is a tuple
            hint = f" (config says r={config.r})" if config.r in expected[key] else ""
            raise AdapterShapeError(
                f"tensor {key!r}{where} has shape {tuple(tensor.shape)}, expected {expected[key]}{hint}", key=key, path=path
            )
        if not tensor.is_floating_point():
            raise AdapterShapeError(
                f"tensor {key!r}{where} has dtype {tensor.dtype}; LoRA weights must be floating point", key=key, path=path
            )


def _check_values_finite(flat: torch.Tensor, tensors: dict[str, torch.Tensor], path: str | None) -> None:
    """Raise :class:`NonFiniteError` naming the first of ``tensors`` (whose values ``flat`` holds,
    concatenated) with a NaN or Inf.

    One sum over all the values: a NaN or Inf anywhere makes it non-finite, so a finite sum proves
    every value finite (six times cheaper than ``isfinite``). A non-finite sum (also a mere
    overflow of large finite values) is settled value by value.
    """
    if math.isfinite(float(flat.sum())) or bool(torch.isfinite(flat).all()):
        return
    key = next(k for k, t in tensors.items() if not bool(torch.isfinite(t).all()))
    where = f" in {path!r}" if path else ""
    raise NonFiniteError(
        f"tensor {key!r}{where} holds NaN or Inf values; the adapter is corrupt or diverged in training: "
        "re-train it or load another version",
        key=key,
        path=path,
    )


def check_fits_dtypes(state_dict: dict[str, torch.Tensor], modules: dict[str, nn.Linear | LoraLinear], path: str | None) -> None:
    """Refuse values that would turn into Inf when cast to a layer's narrower dtype (e.g. 1e300 in a
    float64 file loaded into a float32 model). Only tensors whose dtype differs are looked at."""
    for name, module in modules.items():
        dtype = (module.base_layer if isinstance(module, LoraLinear) else module).weight.dtype
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            t = state_dict[key]
            if t.dtype == dtype or not dtype.is_floating_point or not t.numel():  # the common case: nothing to cast
                continue
            limit = torch.finfo(dtype).max
            if float(t.abs().max()) > limit:
                where = f" in {path!r}" if path else ""
                raise NonFiniteError(
                    f"tensor {key!r}{where} holds values beyond {dtype}'s range (max {limit:.3g}); loaded into this model they "
                    "would become Inf: load it into a model of a wider dtype, or re-save the adapter",
                    key=key,
                    path=path,
                )

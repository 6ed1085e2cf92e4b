"""LoRA weights as state dicts (``<module>.lora_A.weight`` / ``.lora_B.weight``): taken from a
model, and checked against a model before anything is loaded (keys, shapes, dtypes, finiteness,
values that would overflow the model's dtype). Adding an adapter with a ``state_dict`` runs these
checks first, so nothing changes when they fail."""

from __future__ import annotations

import math

import torch
from torch import nn

from mnist_peft.errors import AdapterKeyError, AdapterShapeError, NonFiniteError
from mnist_peft.numerics import MAX_ABS_OUTPUT, first_non_finite, require_bounded_updates, require_finite

from .config import LoraConfig
from .layer import LoraLinear, variant_of
from .targets import find_targets, lora_layers

__all__ = ["adapter_state_dict", "base_state_dict", "check_bounded_updates", "check_lora_state_dict", "check_fits_dtypes"]


def adapter_state_dict(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)}`` of one adapter, copied,
    with its type's extra tensors (DoRA: ``"<module>.lora_magnitude_vector": (out,)``)."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if adapter_name in layer.lora_A:
            # Copies: the caller may edit or keep them without touching the model.
            for suffix, t in layer.adapter_tensors(adapter_name).items():
                out[f"{name}.{suffix}"] = t.detach().clone()
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
        variant_of(config).check_values(state_dict, what=f"adapter {path!r}" if path else "the adapter weights", fix=_LOAD_FIX, path=path)


_LOAD_FIX = "the adapter diverged in training or was tampered with; re-train it or use another version"


def _check_keys(config: LoraConfig, state_dict: dict[str, torch.Tensor], targets: dict[str, tuple[int, int]], path: str | None) -> None:
    where = f" in {path!r}" if path else ""
    expected: dict[str, tuple[int, ...]] = {}
    variant = variant_of(config)
    for name, (out_f, in_f) in targets.items():
        expected[f"{name}.lora_A.weight"] = (config.r, in_f)
        expected[f"{name}.lora_B.weight"] = (out_f, config.r)
        expected.update({f"{name}.{k}": shape for k, shape in variant.extra_shapes(out_f, in_f).items()})
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
            hint = f" (config says r={config.r})" if config.r in expected[key] and len(expected[key]) == 2 else ""
            raise AdapterShapeError(
                f"tensor {key!r}{where} has shape {tuple(tensor.shape)}, expected {expected[key]}{hint}", key=key, path=path
            )
        if not tensor.is_floating_point():
            raise AdapterShapeError(
                f"tensor {key!r}{where} has dtype {tensor.dtype}; LoRA weights must be floating point", key=key, path=path
            )


def _check_values_finite(flat: torch.Tensor, tensors: dict[str, torch.Tensor], path: str | None) -> None:
    """Raise :class:`NonFiniteError` naming the first of ``tensors`` (whose values ``flat`` holds,
    concatenated) with a NaN or Inf: the finiteness gate (:mod:`mnist_peft.numerics`) on ``flat``
    first, one sum over every value (the hot path: a finite sum proves every value finite), and only
    if that fails on each tensor, to name it."""
    if first_non_finite([("", flat)]) is None:
        return
    where = f"adapter {path!r}" if path else "the adapter weights"
    require_finite(
        tensors, what=where, fix="the adapter is corrupt or diverged in training: re-train it or load another version", path=path
    )


def check_bounded_updates(config: LoraConfig, state_dict: dict[str, torch.Tensor], path: str | None = None) -> None:
    """Refuse weights whose update of some layer is not finite or too large on the fixed probe batch
    (:func:`mnist_peft.numerics.require_bounded_updates`; ``io.probe`` runs the same check on files).

    On the load path, so a bound settles most layers first: for a probe row x of unit RMS
    (``||x|| = sqrt(in)``), ``|y_j| <= |s| ||B||_F ||A||_F sqrt(in)``; a layer within the limit by that
    bound passes the probe for sure (one fused norm call for the whole adapter). Only a layer the
    bound does not settle (large or non-finite values) is probed, so the verdict is the probe's.

    Raises:
        NonFiniteError: names the layer (e.g. finite values of 1e19, whose outputs overflow).
    """
    pairs = []
    for key, A in state_dict.items():
        name, sep, _ = key.partition(".lora_A.")
        B = state_dict.get(f"{name}.lora_B.weight") if sep else None
        if B is not None and A.dim() == 2:
            pairs.append((name, A, B))
    if not pairs:
        return
    tensors = [t.detach() for _, A, B in pairs for t in (A, B)]
    foreach_norm = getattr(torch, "_foreach_norm", None)
    norms = [float(n) for n in (foreach_norm(tensors) if foreach_norm else [t.norm() for t in tensors])]
    s = abs(config.scaling)
    unsettled = [
        (name, _float64(A), _float64(B), config.scaling)
        for i, (name, A, B) in enumerate(pairs)
        if not s * norms[2 * i] * norms[2 * i + 1] * math.sqrt(A.shape[1]) <= MAX_ABS_OUTPUT  # NaN and Inf fail too
    ]
    if unsettled:
        where = f"adapter {path!r}" if path else "the adapter weights"
        fix = "the adapter diverged in training or was tampered with; re-train it or use another version"
        require_bounded_updates(unsettled, what=where, fix=fix, path=path)


def _float64(t: torch.Tensor):  # -> numpy.ndarray
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def check_fits_dtypes(state_dict: dict[str, torch.Tensor], modules: dict[str, nn.Linear | LoraLinear], path: str | None) -> None:
    """Refuse values that would turn into Inf when cast to a layer's narrower dtype (e.g. 1e300 in a
    float64 file loaded into a float32 model). Only tensors whose dtype differs are looked at."""
    for name, module in modules.items():
        dtype = (module.base_layer if isinstance(module, LoraLinear) else module).weight.dtype
        for key in [k for k in state_dict if k.startswith(f"{name}.")]:
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

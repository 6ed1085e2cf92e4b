"""The output probe of an adapter: is each layer's update usable on a fixed probe batch?

Finite values are not enough: an adapter of magnitude 1e19 passes every finiteness check, yet a
model it is loaded into answers Inf logits (and NaN probabilities). Each target layer's update is
applied alone to the fixed unit-RMS probe batch of :func:`mnist_peft.numerics.probe_batch`, in
float64, and refused when its outputs are not finite or exceed ``numerics.MAX_ABS_OUTPUT``
(:func:`mnist_peft.numerics.require_bounded_updates`, the one decision). No base is needed, so
``registry add`` and ``registry verify`` run it; loading runs the same check on the tensors it loads
(``tuners/lora/state_dict.py``). Two skinny products per layer: microseconds for a rank-8 adapter.

This module imports neither torch nor the adapter reader at module level: ``registry verify``
(and ``push``, which verifies) stay torch-free; :func:`probe_adapter_bytes` reads the weights with
numpy.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from mnist_peft.errors import CorruptFileError
from mnist_peft.numerics import parse_json_config, require_bounded_updates
from mnist_peft.tuners.dora.magnitude import check_magnitudes, require_no_magnitudes
from mnist_peft.tuners.lora.config import LoraConfig

if TYPE_CHECKING:
    import numpy as np


class _Files(Protocol):
    """What :func:`probe_adapter` reads of an :class:`~mnist_peft.io.adapters.AdapterFiles` (named by
    shape, not imported: the adapter writer imports this module)."""

    config: LoraConfig
    state_dict: Mapping[str, Any]
    path: Any


__all__ = ["PROBE_FIX", "probe_adapter", "probe_adapter_bytes", "probe_layers"]

PROBE_FIX = "the adapter diverged in training or was tampered with; re-train it or use another version"


def probe_layers(tensors: Mapping[str, Any], scaling: float) -> list[tuple[str, np.ndarray, np.ndarray, float]]:
    """``(layer, A, B, scaling)`` per layer of ``tensors`` (``[base_model.model.]<layer>.lora_A[.<name>].weight``
    and its ``lora_B``, numpy arrays or CPU torch tensors), as float64 numpy arrays, in key order.
    A layer missing one of its two tensors is left out (the structure is checked elsewhere)."""
    import numpy as np

    parts: dict[str, dict[str, Any]] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            head, sep, _ = key.partition(f".{part}.")
            if sep:
                parts.setdefault(head.removeprefix("base_model.model."), {})[part] = t
    out = []
    for name, pair in parts.items():
        if len(pair) == 2:
            A, B = (_float64(pair[p], np) for p in ("lora_A", "lora_B"))
            out.append((name, A, B, scaling))
    return out


def _float64(t: Any, np: Any) -> np.ndarray:
    if not isinstance(t, np.ndarray):  # a torch tensor (the caller has torch imported already)
        t = t.detach().to(device="cpu").double().numpy()
    return t.astype(np.float64, copy=False)


def probe_adapter(files: _Files, *, what: str | None = None) -> None:
    """Refuse ``files`` (read with :func:`~mnist_peft.io.adapters.read_adapter`) unless every layer's update
    is finite and bounded on the probe batch (:class:`~mnist_peft.errors.NonFiniteError` naming the layer)."""
    path = None if files.path is None else str(files.path)
    where = what or (f"adapter {path!r}" if path else "the adapter")
    require_bounded_updates(probe_layers(files.state_dict, files.config.scaling), what=where, fix=PROBE_FIX, path=path)
    check_magnitudes(files.state_dict.items(), what=where, fix=PROBE_FIX, path=path)


def probe_adapter_bytes(config: bytes, weights: bytes, *, what: str, path: str | None = None) -> None:
    """:func:`probe_adapter` on the bytes of ``adapter_config.json`` and ``adapter_model.safetensors``,
    read with numpy (torch is imported only for a dtype numpy lacks, e.g. bfloat16).

    Raises:
        CorruptFileError: the bytes are not an adapter's files.
        NonFiniteError: a layer's update is not finite or too large on the probe batch.
    """
    label = "adapter_config.json" if path is None else f"{os.path.dirname(path)}/adapter_config.json"  # path: the weights
    data = parse_json_config(config, path=label, fix=f"{what} is corrupt; re-save or re-download the adapter")
    try:
        cfg = LoraConfig(r=data["r"], lora_alpha=data["lora_alpha"], use_rslora=data.get("use_rslora", False))  # type: ignore[index,union-attr]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # (AdapterConfigError is a ValueError)
        raise CorruptFileError(f"{what}: adapter_config.json is not a readable LoRA config ({exc})", path=path) from None
    tensors = _numpy_tensors(weights, what, path)
    use_dora = data.get("use_dora", False) if isinstance(data, dict) else None
    require_no_magnitudes(tensors, use_dora=use_dora, where=what, error=CorruptFileError)
    require_bounded_updates(probe_layers(tensors, cfg.scaling), what=what, fix=PROBE_FIX, path=path)
    check_magnitudes(tensors.items(), what=what, fix=PROBE_FIX, path=path)  # DoRA's magnitude vectors (no other tensor is looked at)


def _numpy_tensors(weights: bytes, what: str, path: str | None) -> Mapping[str, Any]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        return load(weights)
    except KeyError:  # a dtype numpy lacks (BF16, F8): read with torch
        from safetensors.torch import load as torch_load

        return torch_load(weights)
    except (SafetensorError, ValueError, OverflowError) as exc:
        raise CorruptFileError(f"{what}: adapter_model.safetensors is not readable ({exc})", path=path) from None

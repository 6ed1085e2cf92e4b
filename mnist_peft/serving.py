"""Serving: mixed-adapter batches (one adapter per sample) and hot swap of a merged adapter.

A mixed batch runs every sample through its own adapter (or none) in one forward: per layer, one
GEMM against ``[W; A_1; ...; A_k]`` gives the base output and every adapter's low-rank activations
(all ten r=4 digit adapters stacked are only 40 extra rows); a per-sample column mask keeps only the
sample's own adapter's columns, scaled, and one small GEMM adds ``(x A^T) B^T`` in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import AdapterStateError
from .lora import LoraModel, lora_layers

__all__ = ["mixed_forward", "hot_swap"]


def mixed_forward(model: LoraModel, x: torch.Tensor, adapter_names: Sequence[str | None]) -> torch.Tensor:
    """Forward ``x`` (N, ...) with sample i through adapter ``adapter_names[i]`` (``None``: the bare base).

    Inference only (runs under ``torch.inference_mode``); the model must not be merged. The result
    equals running each sample alone with its adapter, to float rounding of the reordered sums.

    Example:
        >>> logits = mixed_forward(model, x, ["digit-3", None, "digit-9", ...])

    Raises:
        AdapterStateError: an unknown adapter name, a length mismatch, or merged adapters.
    """
    if len(adapter_names) != x.shape[0]:
        raise AdapterStateError(f"got {len(adapter_names)} adapter names for a batch of {x.shape[0]}; give one per sample")
    if model.merged_adapters:
        raise AdapterStateError("mixed batches need unmerged adapters; call unmerge() first")
    names = sorted({n for n in adapter_names if n is not None})
    model._require(names)
    index = {n: i for i, n in enumerate(names)}
    owner = torch.tensor([index[n] if n is not None else -1 for n in adapter_names])  # (N,)
    layers = list(lora_layers(model.model))
    try:
        for _, layer in layers:
            present = [n for n in names if n in layer.lora_A]
            col_owner = torch.cat([torch.full((layer.r[n],), index[n]) for n in present]) if present else torch.empty(0, dtype=torch.long)
            col_scale = torch.cat([torch.full((layer.r[n],), layer.scaling[n]) for n in present]) if present else torch.empty(0)
            column_scale = (owner[:, None] == col_owner[None, :]) * col_scale  # (N, R)
            layer.mixed_batch = (present, column_scale)
        with torch.inference_mode():
            return model(x)
    finally:
        for _, layer in layers:
            layer.mixed_batch = None


def hot_swap(model: LoraModel, adapter_name: str) -> None:
    """Make ``adapter_name`` the one merged adapter: restore the base bit-exactly, merge the new one.

    Both adapters are already loaded; the base weights come back by pointer swap (no arithmetic),
    so no error accumulates however often adapters are swapped.
    """
    model._require([adapter_name])
    model.unmerge()
    model.set_adapter(adapter_name)
    model.merge()

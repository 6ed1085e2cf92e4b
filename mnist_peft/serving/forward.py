"""Serving: mixed-adapter batches (one adapter per sample) and hot swap of a merged adapter.

A mixed batch runs every sample through its own adapter (or none) in one forward. The batch is
put in adapter order first (one gather of the input, one scatter of the output), so each
adapter's samples are one contiguous block of rows: every layer computes the base output for all
rows in one GEMM and adds each adapter's low-rank update to its own block in place. Plain-LoRA
blocks share two GEMMs (``x [A_1; ...; A_k]^T``, each row's columns of other adapters set to exactly
0, then ``[B_1 ... B_k]^T``: the layer's ``_mixed_group_``); a DoRA block, or a batch with a B that
is not finite, runs its own. Either way a row's answer is its own adapter's update plus exact zeros,
so one tenant's NaN or overflow cannot reach another's rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mnist_peft.errors import AdapterStateError
from mnist_peft.tuners.lora.config import BASE_ADAPTER
from mnist_peft.tuners.lora.model import LoraModel

__all__ = ["mixed_forward", "hot_swap"]


def mixed_forward(model: LoraModel, x: torch.Tensor, adapter_names: Sequence[str | None]) -> torch.Tensor:
    """Forward ``x`` (N, ...) with sample i through adapter ``adapter_names[i]`` alone, at its scaling.

    ``None`` or ``"__base__"`` (peft's name) runs that sample through the bare base. Inference only
    (runs under ``torch.inference_mode``); the model must not be merged. Inside
    ``model.disable_adapter()`` every sample gets the bare base. The result follows the model's
    dtype and device, and equals running each sample alone with its adapter, to float rounding of
    the reordered sums.

    Example:
        >>> logits = mixed_forward(model, x, ["digit-3", None, "digit-9", ...])

    Raises:
        AdapterStateError: an unknown adapter name, a length mismatch, or merged adapters.
    """
    if len(adapter_names) != x.shape[0]:
        raise AdapterStateError(f"got {len(adapter_names)} adapter names for a batch of {x.shape[0]}; give one per sample")
    if model.merged_adapters:
        raise AdapterStateError(f"mixed batches need unmerged adapters, but {model.merged_adapters} are merged; call unmerge() first")
    rows = [None if n in (None, BASE_ADAPTER) else n for n in adapter_names]
    names = sorted({n for n in rows if n is not None})
    model.require_adapters(names)
    index = {n: i for i, n in enumerate(names)}
    owner = torch.tensor([index[n] if n is not None else -1 for n in rows], dtype=torch.long)  # (N,)
    counts = torch.bincount(owner + 1, minlength=len(names) + 1).tolist()  # base rows first, then each adapter's
    blocks, start = [], counts[0]
    for name, count in zip(names, counts[1:], strict=True):
        blocks.append((name, start, start + count))
        start += count
    in_order = bool((owner[1:] >= owner[:-1]).all())
    perm = None if in_order else torch.argsort(owner, stable=True).to(x.device)
    model.state.mixed = (len(rows), blocks)
    try:
        with torch.inference_mode():
            y = model(x if perm is None else x.index_select(0, perm))
            if perm is None:
                return y
            return torch.empty_like(y).index_copy_(0, perm, y)  # row perm[j] of the answer is row j of y
    finally:
        model.state.mixed = None


def hot_swap(model: LoraModel, adapter_name: str) -> None:
    """Make ``adapter_name`` the one merged adapter: restore the base bit-exactly, merge the new one.

    Both adapters are already loaded; the base weights come back by pointer swap (no arithmetic),
    so no error accumulates however often adapters are swapped.
    """
    model.require_adapters([adapter_name])
    model.unmerge()
    model.set_adapter(adapter_name)
    model.merge()

"""The task-vector merges of one layer: each takes the adapters' full updates ``delta_t = s_t B_t A_t``
(out, in) and their weights, and returns the merged update (out, in); ``combine_adapters`` then
factors it back to rank r by truncated SVD, exactly as peft's
``add_weighted_adapter(..., combination_type="<method>_svd")`` does (its names are accepted):

- ``task_arithmetic`` (Ilharco et al. 2022): ``sum_t w_t delta_t``; negative weights remove a behaviour;
- ``magnitude_prune``: each delta trimmed to its top ``density`` share of entries by magnitude, then summed;
- ``ties`` (Yadav et al. 2023): trim; elect a sign per entry (``majority_sign`` ``total``: the sign of
  the summed trimmed deltas, ``frequency``: the sign most deltas have); average the weighted entries
  that agree with it (the disjoint mean);
- ``dare_linear`` / ``dare_ties`` (Yu et al. 2023): drop each entry with probability ``1 - density``
  and rescale the rest by ``1/density`` (seeded), then a weighted sum / the TIES election and mean.

TIES has two readings. ``ties_mode="peft"`` (default, peft's): the sign is elected on the
*unweighted* trimmed deltas and the agreeing weighted entries are divided by how many agree.
``ties_mode="mergekit"`` (mergekit's): the sign is elected on the *weighted* trimmed deltas and
the agreeing entries are divided by the sum of the agreeing adapters' weights (so it refuses
negative weights: they would flip or cancel rather than remove a behaviour).

Every function here has the signature of a ``"deltas"`` merge method (see
:mod:`mnist_peft.merging.methods`); ``trim``, ``drop`` and ``disjoint_mean`` are the building
blocks a new method can reuse. The options common to all (density range, TIES mode) are checked
once, by :func:`mnist_peft.merging.methods.merge_deltas`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mnist_peft.errors import AdapterConfigError

__all__ = [
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "trim",
    "drop",
    "disjoint_mean",
]


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``int(density * numel)`` entries by magnitude, zero the rest (peft's ``topk`` mask).

    The k-th largest magnitude is found by selection (``numpy.partition``, linear time; ``topk``
    with k in the hundreds of thousands is ~30x slower) and the entries at or above it are kept.
    That is the ``topk`` set whenever exactly k entries reach it; when ties at the threshold make
    more, which of them ``topk`` keeps is its own choice, so ``topk`` itself is used.
    """
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    magnitude = delta.detach().abs().reshape(-1)
    if magnitude.device.type == "cpu" and magnitude.dtype in (torch.float32, torch.float64):
        import numpy as np

        values = magnitude.numpy()
        threshold = np.partition(values, values.size - k)[values.size - k]
        keep = magnitude >= float(threshold)
        if int(keep.sum()) == k:
            return delta * keep.reshape(delta.shape).to(delta.dtype)
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[torch.topk(magnitude, k=k, largest=True).indices] = 1
    return delta * keep.reshape(delta.shape)


def drop(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescaled by ``1/density``."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def disjoint_mean(stacked: torch.Tensor, w: torch.Tensor, majority_sign: str, ties_mode: str) -> torch.Tensor:
    """TIES: elect a sign per entry, then average the (weighted) entries that agree with it."""
    weighted = stacked * w
    voters = stacked if ties_mode == "peft" else weighted
    sign = voters.sign()
    if majority_sign == "total":
        votes = voters.sum(dim=0)
    elif majority_sign == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise AdapterConfigError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    agree = sign == torch.where(votes >= 0, 1, -1)
    if ties_mode == "peft":
        return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
    total = (agree * w).sum(dim=0)
    return (weighted * agree).sum(dim=0) / torch.where(total == 0, torch.ones_like(total), total)


def _stacked(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The deltas stacked (n, out, in) and the weights shaped to broadcast over them (n, 1, 1)."""
    stacked = torch.stack(list(deltas))
    w = torch.tensor(list(weights), dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    return stacked, w


def _check_mergekit_weights(weights: Sequence[float], ties_mode: str) -> None:
    if ties_mode == "mergekit" and any(w < 0 for w in weights):
        raise AdapterConfigError(
            "mergekit's TIES votes with the weighted deltas and divides by the agreeing weights, so a negative weight "
            "flips or cancels instead of removing a behaviour; use ties_mode='peft' (or task_arithmetic) for negative weights"
        )


def _check_trim_keeps_an_entry(deltas: Sequence[torch.Tensor], density: float) -> None:
    if density < 1 and any(int(density * d.numel()) < 1 for d in deltas):
        raise AdapterConfigError(f"density {density} keeps no entry of a {tuple(deltas[0].shape)} update; raise the density")


def task_arithmetic(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    majority_sign: str = "total",
    ties_mode: str = "peft",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``sum_t w_t delta_t`` (no density)."""
    stacked, w = _stacked(deltas, weights)
    return (stacked * w).sum(dim=0)


def magnitude_prune(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    majority_sign: str = "total",
    ties_mode: str = "peft",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Each delta trimmed to its top ``density`` share by magnitude, then the weighted sum."""
    _check_trim_keeps_an_entry(deltas, density)
    stacked, w = _stacked([trim(d, density) for d in deltas], weights)
    return (stacked * w).sum(dim=0)


def ties(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    majority_sign: str = "total",
    ties_mode: str = "peft",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Trim, elect a sign per entry, average the weighted entries that agree (the disjoint mean)."""
    _check_mergekit_weights(weights, ties_mode)
    _check_trim_keeps_an_entry(deltas, density)
    stacked, w = _stacked([trim(d, density) for d in deltas], weights)
    return disjoint_mean(stacked, w, majority_sign, ties_mode)


def dare_linear(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    majority_sign: str = "total",
    ties_mode: str = "peft",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE drops (seeded by ``generator``), then the weighted sum."""
    stacked, w = _stacked([drop(d, density, generator) for d in deltas], weights)
    return (stacked * w).sum(dim=0)


def dare_ties(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    density: float = 1.0,
    majority_sign: str = "total",
    ties_mode: str = "peft",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE drops (seeded by ``generator``), then the TIES election and disjoint mean."""
    _check_mergekit_weights(weights, ties_mode)
    stacked, w = _stacked([drop(d, density, generator) for d in deltas], weights)
    return disjoint_mean(stacked, w, majority_sign, ties_mode)

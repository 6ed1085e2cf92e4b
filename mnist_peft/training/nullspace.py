"""Keeping an adapter's update out of the other digits' way: the null-space projection of AlphaEdit
(ICLR 2025), GPM (ICLR 2021) and InfLoRA (CVPR 2024), for LoRA's down-projection.

For each adapted layer, the base's inputs to that layer on the *preserved* images (the other
digits' training images) give a covariance ``C = X^T X``. Its eigenvectors ordered by eigenvalue
split the input space: the top ``k`` directions hold a fraction ``energy`` of ``trace(C)`` (what
the other digits use), the rest hold ``1 - energy`` (what they barely use). Training keeps every
row of the adapter's ``A`` in that rest, ``A <- A P`` with ``P = I - U_k U_k^T``, at the start and
after every optimiser step, so the update ``dW = s B A`` satisfies ``dW = dW P``. On the preserved
inputs the layer's output then changes by at most

    ||dW X^T||_F = ||dW P X^T||_F <= ||dW||_2 ||P X^T||_F = ||dW||_2 sqrt(residual * ||X||_F^2),

``residual`` being the share of the preserved inputs' energy outside the top ``k`` directions
(:func:`output_bounds` reports it with the change actually measured). The inputs of the second and
third layers are the base's activations: once the first layer is adapted they move a little, so the
bound is per layer, on the base's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mnist_peft.errors import TrainConfigError
from mnist_peft.model.data import MnistSplit

__all__ = [
    "NullSpace",
    "covariances",
    "layer_inputs",
    "null_space",
    "null_space_report",
    "output_bounds",
    "preserved_spectra",
    "spectra",
    "project_",
]

CHUNK = 4096  # images per forward while the covariances are summed


def _linear_layers(base: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in base.named_modules() if isinstance(m, nn.Linear)}


def layer_inputs(base: nn.Module, x: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """The inputs of each of ``base``'s linear layers on ``x``, ``CHUNK`` images at a time."""
    layers = _linear_layers(base)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args[0].detach())) for name, m in layers.items()
    ]
    try:
        with torch.no_grad():
            for i in range(0, len(x), CHUNK):
                seen.clear()
                base(x[i : i + CHUNK])
                yield dict(seen)
    finally:
        for h in hooks:
            h.remove()


@dataclass
class NullSpace:
    """Per adapted layer (by the base's module name): the projector ``P`` onto the directions the
    preserved inputs barely use, how many directions were kept out, and the share of the preserved
    inputs' energy left in the allowed directions (``residual``)."""

    energy: float
    projectors: dict[str, torch.Tensor]
    kept_out: dict[str, int]
    residual: dict[str, float]
    input_energy: dict[str, float]  # ||X||_F^2 of the preserved inputs, per layer


def covariances(base: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """``X^T X`` (float64) of each linear layer's inputs on ``x``."""
    sums: dict[str, torch.Tensor] = {}
    for inputs in layer_inputs(base, x):
        for name, X in inputs.items():
            X = X.reshape(-1, X.shape[-1]).double()
            sums[name] = sums.get(name, 0) + X.t() @ X
    return sums


Spectrum = tuple[torch.Tensor, torch.Tensor]  # eigenvalues (descending, >= 0) and their eigenvectors (columns)


def spectra(covs: dict[str, torch.Tensor]) -> dict[str, Spectrum]:
    """Each covariance's eigen-decomposition, largest eigenvalue first."""
    found = {}
    for name, c in covs.items():
        values, vectors = torch.linalg.eigh(c)  # ascending
        found[name] = (values.flip(0).clamp_min(0), vectors.flip(1))
    return found


def null_space(covs: dict[str, torch.Tensor] | dict[str, Spectrum], energy: float) -> NullSpace:
    """The projectors that keep an update off the top directions holding ``energy`` of each layer's
    preserved-input energy (``0 < energy < 1``; e.g. 0.99), from the covariances or their :func:`spectra`.

    Raises:
        TrainConfigError: ``energy`` outside (0, 1).
    """
    if not 0 < energy < 1:
        raise TrainConfigError(f"null_space_energy must be in (0, 1) (e.g. 0.99; 0 turns the projection off), got {energy!r}")
    projectors, kept, residual, total = {}, {}, {}, {}
    given = covs if all(isinstance(v, tuple) for v in covs.values()) else spectra(covs)  # type: ignore[arg-type]
    for name, (values, vectors) in given.items():
        trace = float(values.sum())
        cum = values.cumsum(0) / trace
        k = int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype)).item()) + 1
        u = vectors[:, :k]
        projectors[name] = (torch.eye(u.shape[0], dtype=u.dtype) - u @ u.t()).float()
        kept[name], residual[name], total[name] = k, float(1 - cum[k - 1]), trace
    return NullSpace(energy, projectors, kept, residual, total)


def _base_name(lora_name: str, names: set[str]) -> str:
    """The base's module name for a LoRA layer's name (a LoraModel may prefix it)."""
    for name in names:
        if lora_name == name or lora_name.endswith("." + name):
            return name
    raise TrainConfigError(f"no base layer for the adapted layer {lora_name!r}; the null space covers {sorted(names)}")


def project_(model: nn.Module, space: NullSpace, adapter: str = "default") -> None:
    """Put every row of ``adapter``'s A into its layer's allowed directions: ``A <- A P``, in place."""
    from mnist_peft.tuners.lora.targets import lora_layers

    with torch.no_grad():
        for name, layer in lora_layers(model):
            if adapter in layer.lora_A:
                a = layer.lora_A[adapter]
                a.copy_(a @ space.projectors[_base_name(name, set(space.projectors))].to(a.dtype))


def output_bounds(
    model: nn.Module, base: nn.Module, x: torch.Tensor, space: NullSpace, adapter: str = "default"
) -> dict[str, dict[str, float]]:
    """Per adapted layer, on the images ``x`` (the base's inputs to the layer, ``X``): the change of
    the layer's output ``||dW X^T||_F`` measured and the bound ``||dW||_2 ||P X^T||_F`` (which holds
    for any inputs once ``dW = dW P``), both relative to the base layer's own output ``||W X^T||_F``."""
    from mnist_peft.tuners.lora.targets import lora_layers

    deltas = {}
    for name, layer in lora_layers(model):
        if adapter in layer.lora_A:
            base_name = _base_name(name, set(space.projectors))
            deltas[base_name] = (layer.get_delta_weight(adapter).detach().double(), layer.base_layer.weight.detach().double())
    change = dict.fromkeys(deltas, 0.0)
    output = dict.fromkeys(deltas, 0.0)
    outside = dict.fromkeys(deltas, 0.0)
    for inputs in layer_inputs(base, x):
        for name, (dw, w) in deltas.items():
            X = inputs[name].double()
            change[name] += float((X @ dw.t()).square().sum())
            output[name] += float((X @ w.t()).square().sum())
            outside[name] += float((X @ space.projectors[name].double()).square().sum())  # P is symmetric
    found = {}
    for name, (dw, _) in deltas.items():
        spectral = float(torch.linalg.matrix_norm(dw, ord=2))
        bound = spectral * outside[name] ** 0.5
        found[name] = {"change": change[name] ** 0.5 / output[name] ** 0.5, "bound": bound / output[name] ** 0.5}
    return found


_SPECTRA: dict[tuple, dict[str, Spectrum]] = {}  # the last (base, digit, split)s asked: a study trains them again and again
SPECTRA_KEPT = 10  # one per digit (~45 MB each)


def preserved_spectra(base: nn.Module, train: MnistSplit, digit: int) -> dict[str, Spectrum]:
    """The :func:`spectra` of each layer's inputs on the other digits' training images (this run's
    training split), kept for the last :data:`SPECTRA_KEPT` (base, digit, split) asked."""
    import hashlib

    from mnist_peft.model.mlp import base_fingerprint

    split = hashlib.sha256(train.y.numpy().tobytes() + train.x.contiguous().numpy().tobytes()).hexdigest()  # every byte: ~0.2 s
    key = (base_fingerprint(base), digit, split)
    if key not in _SPECTRA:
        while len(_SPECTRA) >= SPECTRA_KEPT:
            _SPECTRA.pop(next(iter(_SPECTRA)))
        _SPECTRA[key] = spectra(covariances(base, train.x[train.y != digit]))
    return _SPECTRA[key]


def null_space_report(model: nn.Module, base: nn.Module, test: MnistSplit, digit: int, space: NullSpace) -> dict[str, dict[str, float]]:
    """Per layer: directions kept out, the preserved energy left in the allowed ones (training
    images), and the output change on the other digits' *test* images against its bound."""
    bounds = output_bounds(model, base, test.x[test.y != digit], space)
    return {name: {"kept_out": space.kept_out[name], "residual": space.residual[name], **bounds.get(name, {})} for name in space.projectors}

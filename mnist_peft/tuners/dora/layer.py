"""Native DoRA, from scratch in plain PyTorch (no ``peft`` import here): the math, as a LoRA variant.

DoRA (Liu et al. 2024) keeps LoRA's A and B and adds a magnitude vector m (out,) per layer::

    W' = m / ||W + s B A||_row * (W + s B A)
    y  = x W^T + b + (m/n - 1) * (x W^T) + (m/n) * s * (x A^T) B^T        n = ||W + s B A||_row, detached

It is a :class:`~mnist_peft.tuners.lora.layer.LoraVariant`: the LoRA layer holds its A and B and
hands it every per-adapter step, so LoRA and DoRA adapters share a layer, a stack and a mixed batch.

- *exact* forward: peft's float ops (``peft.tuners.lora.dora.DoraLinearLayer.forward``: the update
  ``B A`` built as ``B(A(I)).T``, the norm of ``W + s B A`` per row, then
  ``(m/n - 1) * (result - b) + (m/n) * s * B(A(x))`` added to the output so far), bit-identical
  outputs and gradients. Used with autograd, dropout, or ``forward_mode="exact"``.
- *inference* (float32/float64; the LoRA layer sends other dtypes down the exact path): the norm
  from one ``addmm`` (``W + s B A``) and the update added in place; equal to the exact path to float
  rounding.
- stack weight w (this package's weighted stacks): the adapter's term times w (w = 1: peft's ops; w =
  0: the output so far). In a stack, as in peft, a DoRA term rescales the output so far, so the
  adapters before it in the stack are rescaled with the base.
- merge: ``f * (W + delta)`` with ``f = m / ||W_base + delta||`` (peft's bits; with w:
  ``(1 + w (f - 1)) W + w f delta``), as a :class:`DoraDelta` step of the LoRA merge ledger, which
  keeps the original weight, so unmerge is bit-exact (peft divides by f and drifts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.errors import NonFiniteError
from mnist_peft.tuners.lora import ledger
from mnist_peft.tuners.lora.layer import LoraLinear, LoraVariant, get_delta_weight

from .magnitude import MAGNITUDE_KEY, check_magnitudes

__all__ = ["DORA", "DoraDelta", "DoraVariant", "dora_term", "weight_norm"]


# ----------------------------------------------------------------------------- pure math
def weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||weight + scaling * lora_weight||`` per row, in ``weight``'s dtype (peft's ``get_weight_norm``)."""
    w = weight + scaling * lora_weight
    return torch.linalg.norm(w, dim=1).to(w.dtype)


def dora_term(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float,
    base_layer: nn.Linear,
    base_result: torch.Tensor | None,
    norm_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The DoRA term added to the output so far, with peft's float ops (also for gradients).
    ``base_result``: the output so far (its bias is taken off), or None (with dropout: ``x W^T`` is computed).
    ``norm_weight``: the weight whose rows the norm is taken of, the unmerged base weight (default: the
    live one; the same tensor unless other adapters are merged into the layer)."""
    x_eye = torch.eye(lora_A.shape[1], device=lora_A.device, dtype=lora_A.dtype)
    lora_weight = F.linear(F.linear(x_eye, lora_A), lora_B).T.to(x.dtype)
    weight = base_layer.weight.to(x.dtype)
    unmerged = weight if norm_weight is None else norm_weight.to(x.dtype)
    norm = weight_norm(unmerged, lora_weight.detach(), scaling).detach()  # detached: section 4.3 of the paper
    mag_norm_scale = (magnitude / norm).view(1, -1)
    lora_result = F.linear(F.linear(x, lora_A), lora_B)
    if base_result is not None:
        if base_layer.bias is not None:
            base_result = base_result - base_layer.bias
    else:
        base_result = F.linear(x, weight)
    return (mag_norm_scale - 1) * base_result + mag_norm_scale * lora_result * scaling


def _fast_term(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    m: torch.Tensor,
    s: float,
    base_layer: nn.Linear,
    result: torch.Tensor,
    W: torch.Tensor,
) -> torch.Tensor:
    """:func:`dora_term` for inference (no autograd), in fewer passes: the norm (of ``W``, the unmerged
    base weight) from one ``addmm``."""
    f = m.detach() / torch.linalg.vector_norm(torch.addmm(W, B.detach(), A.detach(), alpha=s), dim=1)  # (out,)
    base = result - base_layer.bias if base_layer.bias is not None else result.clone()
    lora = F.linear(F.linear(x, A.detach()), B.detach())
    return base.mul_(f - 1).add_(lora.mul_(f * s))


# ----------------------------------------------------------------------------- the merge step
@dataclass(frozen=True)
class DoraDelta:
    """DoRA's step of the merge ledger: ``f * (W + delta)`` with the row factor ``f = m / ||W_base + delta||``
    fixed when the merge was planned (so a replay gives the same bits); with stack weight w != 1,
    ``(1 + w (f - 1)) W + w f delta``."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    factor: torch.Tensor  # (out,)
    weight: float = 1.0

    def merge_into(self, out: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        f = self.factor.view(-1, 1)
        if self.weight == 1.0:  # peft: dora_factor * (W + delta_weight)
            if delta is None:
                return ledger.delta_weight_into(out, self.A, self.B, self.scaling).add_(weight).mul_(f)
            return out.add_(ledger.delta_weight_into(delta, self.A, self.B, self.scaling)).mul_(f)
        w = self.weight
        d = ledger.delta_weight_into(torch.empty_like(out) if delta is None else delta, self.A, self.B, self.scaling)
        d.mul_(f * w)
        if delta is None:
            return torch.mul(weight, 1 + w * (f - 1), out=out).add_(d)
        return out.mul_(1 + w * (f - 1)).add_(d)

    def kept(self) -> DoraDelta:
        return DoraDelta(self.A.clone(), self.B.clone(), self.scaling, self.factor.clone(), self.weight)


MIN_ROW_NORM = 1e-3
"""The smallest ``||W + s B A||_j`` a DoRA adapter may give a row, relative to the base row's norm."""


def _require_row_norms(n: torch.Tensor, base: torch.Tensor, *, layer_name: str, path: str | None) -> None:
    floor = torch.clamp(base * MIN_ROW_NORM, min=torch.finfo(torch.float32).tiny)
    bad = ~(n > floor)  # NaN fails too
    if bool(bad.any()):
        j = int(bad.nonzero()[0])
        where = f"adapter {path!r}" if path else "the DoRA adapter"
        raise NonFiniteError(
            f"{where} gives row {j} of {layer_name!r} a norm ||W + s B A|| of {float(n[j]):.3g} (the base row's: "
            f"{float(base[j]):.3g}): DoRA divides by it, so the outputs would be NaN or overflow. Re-train the adapter, "
            "or use a base whose rows are not zero; nothing was loaded",
            key=f"{layer_name}.lora_magnitude_vector",
            path=path,
        )


# ----------------------------------------------------------------------------- the variant
def _magnitudes(layer: LoraLinear) -> nn.ParameterDict:
    """The layer's ``lora_magnitude_vector`` (adapter name -> m), made on first use (as peft does)."""
    mags = layer._modules.get(MAGNITUDE_KEY)
    if mags is None:
        mags = nn.ParameterDict()
        layer.add_module(MAGNITUDE_KEY, mags)
    return mags  # type: ignore[return-value]


class DoraVariant(LoraVariant):
    """DoRA on a :class:`~mnist_peft.tuners.lora.layer.LoraLinear`: the magnitude vector and the
    rescaled update (see the module docstring)."""

    name = "dora"
    fusable = False
    rescales = True
    extra_keys = (MAGNITUDE_KEY,)

    def init(self, layer: LoraLinear, adapter_name: str, weights: Mapping[str, torch.Tensor] | None) -> None:
        """m from ``weights``, else peft's init: ``||W + s B A||`` per row (B = 0 at the default init: W's row norms)."""
        if weights is not None:
            m = layer.own_copy(weights[MAGNITUDE_KEY])
        else:
            A, B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            with torch.no_grad():
                if A.dtype == torch.float16:  # peft: fp16 computed in fp32, the product cast back
                    lora_weight = (B.float() @ A.float()).half()
                else:
                    lora_weight = B @ A
                m = weight_norm(layer.base_layer.weight.detach(), lora_weight, layer.scaling[adapter_name])
                W = layer.base_layer.weight.detach().float()
                n = torch.linalg.vector_norm(W + layer.scaling[adapter_name] * lora_weight.float(), dim=1)
                _require_row_norms(n, torch.linalg.vector_norm(W, dim=1), layer_name=type(layer.base_layer).__name__, path=None)
        _magnitudes(layer)[adapter_name] = nn.Parameter(m)

    def check_base(
        self, base_layer: nn.Linear, config: object, weights: Mapping[str, torch.Tensor] | None, *, layer_name: str, path: str | None
    ) -> None:
        """Refuse rows whose norm ``||W + s B A||`` is (near) zero: DoRA divides by it, so its outputs would be
        NaN, or huge terms that cancel. The floor is 1e-3 of the base row's norm (a real adapter turns a row,
        it does not cancel it), and above zero. A fresh adapter is checked when its B starts at zero."""
        if weights is None and getattr(config, "init_lora_weights", True) is False:
            return  # random A and B: drawn later; init() checks them
        with torch.no_grad():
            W = base_layer.weight.detach().float()
            if weights is None:
                n = torch.linalg.vector_norm(W, dim=1)
            else:
                A, B = (weights[k].detach().to(device=W.device, dtype=torch.float32) for k in ("lora_A.weight", "lora_B.weight"))
                n = torch.linalg.vector_norm(torch.addmm(W, B, A, alpha=float(getattr(config, "scaling", 1.0))), dim=1)
            _require_row_norms(n, torch.linalg.vector_norm(W, dim=1), layer_name=layer_name, path=path)

    def extra_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {MAGNITUDE_KEY: (out_features,)}

    def check_values(self, tensors: Mapping[str, torch.Tensor], *, what: str, fix: str, path: str | None) -> None:
        check_magnitudes(tensors.items(), what=what, fix=fix, path=path)

    def parameters(self, layer: LoraLinear, adapter_name: str) -> dict[str, nn.Parameter]:
        return {MAGNITUDE_KEY: _magnitudes(layer)[adapter_name]}

    def delete(self, layer: LoraLinear, adapter_name: str) -> None:
        mags = _magnitudes(layer)
        if adapter_name in mags:
            del mags[adapter_name]

    def forward(self, layer: LoraLinear, adapter_name: str, x: torch.Tensor, result: torch.Tensor, exact: bool) -> torch.Tensor:
        A, B, s = layer.lora_A[adapter_name], layer.lora_B[adapter_name], layer.scaling[adapter_name]
        m = _magnitudes(layer)[adapter_name]
        p = layer.lora_dropout[adapter_name]
        base_result: torch.Tensor | None = result
        if p > 0 and layer.training:  # peft: the dropped-out input, and x W^T computed from it
            x, base_result = F.dropout(x, p, True), None
        W = layer.unmerged_weight()  # the norm's weight: the base without merged adapters, as a merge computes it
        if exact or base_result is None:
            term = dora_term(x, A, B, m, s, layer.base_layer, base_result, W)
        else:
            term = _fast_term(x, A, B, m, s, layer.base_layer, result, W)
        w = layer.state.weight(adapter_name)
        return result + term if w == 1.0 else result + w * term

    def mixed_block_(self, layer: LoraLinear, adapter_name: str, result: torch.Tensor, rows: torch.Tensor, exact: bool) -> None:
        A, B, s = layer.lora_A[adapter_name], layer.lora_B[adapter_name], layer.scaling[adapter_name]
        m = _magnitudes(layer)[adapter_name]
        W = layer.unmerged_weight()
        if exact:  # the ops of this block run alone through peft's layer
            result.copy_(result + dora_term(rows, A, B, m, s, layer.base_layer, result, W))
        else:
            result.add_(_fast_term(rows, A, B, m, s, layer.base_layer, result, W))

    def merge_step(self, layer: LoraLinear, adapter_name: str) -> DoraDelta:
        """The factor from the unmerged base weight (peft's ``_unmerged_base_weight``): ``m / ||W_base + delta||``."""
        A, B, s = layer.lora_A[adapter_name].detach(), layer.lora_B[adapter_name].detach(), layer.scaling[adapter_name]
        with torch.no_grad():
            base = layer.unmerged_weight()
            norm = weight_norm(base, get_delta_weight(A, B, s), 1)
            factor = _magnitudes(layer)[adapter_name].detach() / norm
        return DoraDelta(A, B, s, factor, layer.state.weight(adapter_name))

    def merged_difference(self, layer: LoraLinear, adapter_name: str) -> torch.Tensor:
        """What merging the adapter alone (stack weight 1) adds to the unmerged weight: ``f (W + s B A) - W``
        (``get_delta_weight`` is peft's ``s B A``, as for LoRA)."""
        with torch.no_grad():
            step = self.merge_step(layer, adapter_name)
            step = DoraDelta(step.A, step.B, step.scaling, step.factor, 1.0)
            W = layer.unmerged_weight()
            return step.merge_into(torch.empty_like(W), W, None) - W


DORA = DoraVariant()

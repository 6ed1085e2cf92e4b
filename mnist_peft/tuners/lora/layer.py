"""Native LoRA, from scratch in plain PyTorch (no ``peft`` import here): the layer and its math.

The LoRA equation, for a linear layer with weight W (out, in) and bias b::

    y = x W^T + b + ((dropout(x) A^T) B^T) * scaling        A: (r, in), B: (out, r)
    scaling = lora_alpha / r        (or lora_alpha / sqrt(r) with rsLoRA)

Several adapters can live on one layer, held per name as in PEFT. Active adapters stack with
per-adapter weights w_i: y = x W^T + b + sum_i w_i * scaling_i * B_i A_i x.

State has one owner. The :class:`~mnist_peft.tuners.lora.model.LoraModel` holds an
:class:`AdapterState` (the active adapters, their stack weights, the disable switch, the forward
mode, a pending mixed batch) and every :class:`LoraLinear` of the model reads that same object; a
layer skips active names it does not hold, so adapters on different subsets of layers work in
every operation. What is merged is a fact about each layer's weight, so each layer keeps its
``merged_adapters``; the model's list is their union.

Two forward paths compute the same equation:
- *exact*: the same float operations, in the same order, as ``peft``'s LoRA layer (bit-identical
  outputs and gradients). Used whenever autograd is recording, with active dropout, for dtypes
  other than fp32/fp64, or when asked for with :func:`~mnist_peft.tuners.lora.model.set_forward_mode`.
- *fused* (inference, :mod:`mnist_peft.tuners.lora.fused`): one GEMM over buffers the parameters
  live in, so no edit of any kind can leave it stale. It agrees with the exact path to float
  rounding (see ``peft_compat.FUSED_TOLERANCE``), not bit for bit.

Merge is out of place and ``unmerge`` restores the base weight bit-exactly; how, and what it
assumes, is the merge ledger's (:mod:`mnist_peft.tuners.lora.ledger`).

Adapter types that share LoRA's A and B (DoRA) plug in per adapter, as peft's ``lora_variant``:
each adapter's config names its :class:`LoraVariant` (``config.layer_variant()``; None is plain
LoRA, this module's :class:`LoraVariant` itself), and the layer hands every per-adapter step
(create, forward, a mixed-batch block, a merge step, its extra tensors) to it. So LoRA and DoRA
adapters live on one layer, stack, and share one mixed batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.errors import AdapterConfigError, AdapterStateError

from . import fused, ledger
from .config import BASE_ADAPTER, InitKind, LoraConfig

__all__ = [
    "AdapterState",
    "ForwardMode",
    "LoraLinear",
    "LoraVariant",
    "get_delta_weight",
    "init_lora_weights_",
    "lora_forward",
    "release_layer",
    "valid_adapter_name",
]


# ----------------------------------------------------------------------------- pure math
def get_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update ``(B @ A) * scaling``, (out, in); the same float ops as peft's (which, for
    float16/bfloat16 weights on CPU, computes in float32 and casts the result)."""
    if ledger.delta_in_float32(lora_B):
        return ((lora_B.float() @ lora_A.float()) * scaling).to(lora_B.dtype)
    return (lora_B @ lora_A) * scaling


def lora_forward(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The LoRA branch ``((x A^T) B^T) * scaling``, (N, out); the same float ops as peft's."""
    return F.linear(F.linear(x, lora_A), lora_B) * scaling


def init_lora_weights_(lora_A: torch.Tensor, lora_B: torch.Tensor, init: InitKind) -> None:
    """Initialise A and B in place, drawing from the global RNG in peft's order.

    peft builds ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` (each draws a kaiming-uniform
    weight) and then re-initialises; replaying those draws makes a seeded native adapter
    bit-identical to peft's. The seed notebook's init draws only A ~ N(0, 1).
    """
    with torch.no_grad():
        if init == "seed":
            lora_A.normal_(0.0, 1.0)
            lora_B.zero_()
            return
        nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))  # nn.Linear(in, r).reset_parameters()
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))  # nn.Linear(r, out).reset_parameters()
        if init is True:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            lora_B.zero_()
        elif init == "gaussian":
            nn.init.normal_(lora_A, std=1 / lora_A.shape[0])
            lora_B.zero_()


def _mixed_block_(result: torch.Tensor, rows: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, exact: bool) -> None:
    """Add one mixed-batch block's update ``s (rows A^T) B^T`` to ``result`` (its rows' output) in place."""
    if exact or result.dim() != 2:  # peft's ops on the block (its mixed batches do the same)
        result += lora_forward(rows, A, B, s)
    else:  # (s x A^T) B^T added in place by one rank-r GEMM
        result.addmm_((rows @ A.t()).mul_(s), B.t())


# The shared GEMMs cost (rows spanned) x (sum of the ranks): past these sizes the blocks' own GEMMs
# (rows x rank each) are cheaper than the wasted products, whatever the per-op overhead saved.
GROUP_MAX_RANK = 128
GROUP_MAX_ROWS = 256


def _mixed_group_(result: torch.Tensor, x: torch.Tensor, group: list[tuple[torch.Tensor, torch.Tensor, float, int, int]]) -> bool:
    """Add the updates of several plain-LoRA blocks of a mixed batch to ``result`` in place with two
    GEMMs instead of two per block: ``h = x [A_1; ...; A_k]^T`` over the rows the blocks span, each
    row's columns of other adapters set to exactly 0 (``torch.where``: a product that overflowed or is
    NaN there is dropped, not multiplied), each column scaled by its adapter's ``s``, then
    ``result += h [B_1 ... B_k]^T``. A row's answer is its own adapter's ``s (x A^T) B^T`` plus exact
    zeros (0 x a finite B): nothing of another row or another adapter reaches it. Returns False, having
    changed nothing, when a B is not finite (0 x NaN is NaN) or the group is past :data:`GROUP_MAX_RANK`
    or :data:`GROUP_MAX_ROWS`: the caller then adds the blocks one by one.
    ``group`` holds ``(A, B, s, start, stop)`` per block, the blocks in row order."""
    lo, hi = group[0][3], group[-1][4]
    if sum(A.shape[0] for A, *_ in group) > GROUP_MAX_RANK or hi - lo > GROUP_MAX_ROWS:
        return False
    b_t = torch.cat([B.t() for _, B, *_ in group], 0)  # (R, out)
    if not bool(torch.isfinite(b_t).all()):  # loaded adapters passed the finiteness gate; one edited in place may not
        return False
    a_t = torch.cat([A.t() for A, *_ in group], 1)  # (in, R): contiguous, as the GEMM wants it
    mask = torch.zeros(hi - lo, a_t.shape[1], dtype=torch.bool, device=x.device)
    scale = torch.empty(a_t.shape[1], dtype=x.dtype, device=x.device)
    col = 0
    for A, _, s, start, stop in group:
        mask[start - lo : stop - lo, col : col + A.shape[0]] = True
        scale[col : col + A.shape[0]] = s
        col += A.shape[0]
    h = torch.where(mask, (x[lo:hi] @ a_t).mul_(scale), 0.0)
    result[lo:hi].addmm_(h, b_t)
    return True


# ----------------------------------------------------------------------------- the adapter-type seam
class LoraVariant:
    """How one adapter of a :class:`LoraLinear` computes; this class is plain LoRA.

    An adapter type that shares LoRA's A and B subclasses it (DoRA:
    :class:`mnist_peft.tuners.dora.layer.DoraVariant`) and is named by its config's
    ``layer_variant()``. Every method takes the layer and the adapter's name; the layer calls
    nothing else of a type, so a new type touches no LoRA code.
    """

    name = "lora"
    fusable = True
    """Whether the fused inference path (:mod:`~mnist_peft.tuners.lora.fused`, the update
    ``s (x A^T) B^T``) computes this type; otherwise the layer runs each adapter's :meth:`forward`."""
    rescales = False
    """Whether the adapter's term rescales the output so far (DoRA: ``(m/n - 1) (y - b)``): then the order
    of a stack matters, and a merge must take a prefix of the active stack (:meth:`LoraModel.merge`)."""
    extra_keys: tuple[str, ...] = ()
    """Per-layer tensors beyond ``lora_A.weight``/``lora_B.weight``, by their key suffix in a state dict
    (DoRA: ``lora_magnitude_vector``)."""

    def init(self, layer: LoraLinear, adapter_name: str, weights: Mapping[str, torch.Tensor] | None) -> None:
        """Create the type's own tensors for a new adapter (A and B exist already); ``weights`` holds the
        layer's tensors by key suffix when loading (copy them), else None (initialise them)."""

    def extra_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """The shape of each of :attr:`extra_keys` on a layer of this size (checked before a load)."""
        return {}

    def check_base(
        self, base_layer: nn.Linear, config: Any, weights: Mapping[str, torch.Tensor] | None, *, layer_name: str, path: str | None
    ) -> None:
        """Refuse an adapter that this base layer cannot run (checked for every layer before any changes)."""

    def check_values(self, tensors: Mapping[str, torch.Tensor], *, what: str, fix: str, path: str | None) -> None:
        """Refuse loaded values of the type's own tensors that would overflow the model (``tensors`` holds
        the whole adapter; A and B are checked by the LoRA checks)."""

    def parameters(self, layer: LoraLinear, adapter_name: str) -> dict[str, nn.Parameter]:
        """The type's own parameters of one adapter, by key suffix (for state dicts and trainability)."""
        return {}

    def delete(self, layer: LoraLinear, adapter_name: str) -> None:
        """Drop the type's own tensors of one adapter."""

    def forward(self, layer: LoraLinear, adapter_name: str, x: torch.Tensor, result: torch.Tensor, exact: bool) -> torch.Tensor:
        """``result`` (the output so far) with this adapter's update added, at its effective scaling
        (scaling x stack weight). With ``exact`` the same float ops as peft's layer (also for gradients)."""
        p = layer.lora_dropout[adapter_name]  # what nn.Dropout(p) would do (identity at p = 0, as peft's nn.Identity)
        xd = F.dropout(x, p, layer.training) if p > 0 else x
        return result + lora_forward(xd, layer.lora_A[adapter_name], layer.lora_B[adapter_name], layer.effective_scaling(adapter_name))

    def mixed_block_(self, layer: LoraLinear, adapter_name: str, result: torch.Tensor, rows: torch.Tensor, exact: bool) -> None:
        """Add the adapter's update (at its scaling, no stack weight) to ``result``, the base output of its
        rows ``rows`` in a mixed batch, in place (inference only)."""
        _mixed_block_(result, rows, layer.lora_A[adapter_name], layer.lora_B[adapter_name], layer.scaling[adapter_name], exact)

    def merge_step(self, layer: LoraLinear, adapter_name: str) -> ledger.MergeStep:
        """The adapter's update as the merge ledger takes it, at its effective scaling."""
        return ledger.LoraDelta(
            layer.lora_A[adapter_name].detach(), layer.lora_B[adapter_name].detach(), layer.effective_scaling(adapter_name)
        )

    def delta_weight(self, layer: LoraLinear, adapter_name: str) -> torch.Tensor:
        """peft's ``get_delta_weight``: ``(B @ A) * scaling`` (plain LoRA merges as weight + delta; a type
        that merges otherwise, DoRA, says how in its :meth:`merge_step`)."""
        return get_delta_weight(layer.lora_A[adapter_name], layer.lora_B[adapter_name], layer.scaling[adapter_name])


PLAIN_LORA = LoraVariant()


def variant_of(config: Any) -> LoraVariant:
    """The :class:`LoraVariant` a config asks for (``config.layer_variant()``; plain LoRA when None)."""
    found = config.layer_variant() if hasattr(config, "layer_variant") else None
    return PLAIN_LORA if found is None else found


# ----------------------------------------------------------------------------- the state
ForwardMode = Literal["auto", "exact"]


@dataclass
class AdapterState:
    """What a :class:`~mnist_peft.tuners.lora.model.LoraModel` has chosen; one object shared by all its layers.

    ``active`` and ``weights`` hold every name the model activated, unfiltered: a layer that does
    not hold an adapter skips it. ``mixed`` is set for one call by :func:`mnist_peft.serving.forward.mixed_forward`
    on a batch of N samples it has put in adapter order: ``(N, [(name, start, stop), ...])``, the
    rows of each adapter's samples (rows in no block run through the bare base).
    """

    active: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    disabled: bool = False
    forward_mode: ForwardMode = "auto"
    mixed: tuple[int, list[tuple[str, int, int]]] | None = None

    def weight(self, name: str) -> float:
        return self.weights.get(name, 1.0)


# ----------------------------------------------------------------------------- the layer
def valid_adapter_name(name: object) -> bool:
    """Whether ``name`` can name an adapter: a non-empty ``str`` without '.', not starting with '_',
    not :data:`BASE_ADAPTER`, and not an attribute of the dicts that hold the weights ('keys',
    'training', ...: such a name would replace the attribute and break the layer)."""
    return (
        isinstance(name, str)
        and bool(name)
        and "." not in name
        and not name.startswith("_")
        and name != BASE_ADAPTER
        and not hasattr(_ATTRIBUTES_PROBE, name)
    )


class _AdapterParameters(nn.ParameterDict):
    """``nn.ParameterDict`` (adapter name -> Parameter) whose item assignment and deletion go
    straight to the parameter table when nothing else could be affected: ``Module.__setattr__``'s
    generic search costs more than the rest of adding one layer's adapter. Anything unusual (a
    name that is also an attribute, a non-Parameter value, global registration hooks) takes
    ``nn.ParameterDict``'s own path."""

    def __setitem__(self, key: str, value: object) -> None:
        if (
            type(value) is nn.Parameter
            and isinstance(key, str)
            and key
            and "." not in key
            and key not in self.__dict__
            and not hasattr(type(self), key)
            and not getattr(nn.modules.module, "_global_parameter_registration_hooks", True)
        ):
            self._keys[key] = None
            self._parameters[key] = value
        else:
            super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        if key in self._parameters and key in self._keys:
            del self._keys[key]
            del self._parameters[key]
        else:
            super().__delitem__(key)


_ATTRIBUTES_PROBE = _AdapterParameters()  # an empty one: its attributes are the names adapters cannot take


class LoraLinear(nn.Module):
    """An ``nn.Linear`` (kept as ``base_layer``) with named LoRA adapters.

    The active adapters, stack weights and switches come from ``state`` (the model's
    :class:`AdapterState`); a layer made on its own gets a state of its own.
    """

    def __init__(self, base_layer: nn.Linear, state: AdapterState | None = None) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise AdapterConfigError(f"LoRA targets nn.Linear layers, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.lora_A = _AdapterParameters()  # name -> (r, in)
        self.lora_B = _AdapterParameters()  # name -> (out, r)
        self.lora_dropout: dict[str, float] = {}  # name -> dropout probability (applied as F.dropout, as nn.Dropout does)
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, LoraVariant] = {}  # name -> its adapter type (plain LoRA, DoRA, ...)
        self.state = state if state is not None else AdapterState()
        self.merged_adapters: list[str] = []
        self._merge: ledger.MergeRecord | None = None  # while merged: how to restore the base
        self._buffers_cache: dict[str, torch.Tensor] = {}  # reused scratch for merges
        ledger.track_data_access(base_layer.weight)
        self._layout: fused.FusedLayout | None = None

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapters(self) -> list[str]:
        """The model's active adapters that this layer holds."""
        return [n for n in self.state.active if n in self.lora_A]

    # -- adapters
    def update_layer(
        self, adapter_name: str, config: LoraConfig, weights: Mapping[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Add (or re-create) adapter ``adapter_name``: fresh weights drawn per ``config``, or
        ``weights`` copied in (no random draws): the layer's tensors by key suffix
        (``{"lora_A.weight": A, "lora_B.weight": B, ...}``, plus the type's :attr:`LoraVariant.extra_keys`),
        or ``(A, B)`` for plain LoRA."""
        w = self.base_layer.weight
        if isinstance(weights, tuple):
            weights = {"lora_A.weight": weights[0], "lora_B.weight": weights[1]}
        if weights is None:
            A = torch.empty(config.r, self.in_features, dtype=w.dtype, device=w.device)
            B = torch.empty(self.out_features, config.r, dtype=w.dtype, device=w.device)
            init_lora_weights_(A, B, config.init_lora_weights)
        else:
            A, B = (self.own_copy(weights[k]) for k in ("lora_A.weight", "lora_B.weight"))
        self.lora_A[adapter_name] = nn.Parameter(A)
        self.lora_B[adapter_name] = nn.Parameter(B)
        self.lora_dropout[adapter_name] = config.lora_dropout
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling
        old = self.variants.get(adapter_name)
        if old is not None:
            old.delete(self, adapter_name)
        variant = self.variants[adapter_name] = variant_of(config)
        variant.init(self, adapter_name, weights)

    def own_copy(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` copied, in the base weight's dtype and device (a loaded tensor is never shared)."""
        w = self.base_layer.weight
        return t.clone() if t.dtype == w.dtype and t.device == w.device else t.to(dtype=w.dtype, device=w.device)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise AdapterStateError(f"adapter {adapter_name!r} is merged; call unmerge() before deleting it")
        self.variants.pop(adapter_name, PLAIN_LORA).delete(self, adapter_name)
        for d in (self.lora_A, self.lora_B):
            del d[adapter_name]
        for d in (self.lora_dropout, self.r, self.lora_alpha, self.scaling):
            d.pop(adapter_name, None)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """One adapter's ``(B @ A) * scaling`` (out, in), as peft's layer method (no stack weight). For plain
        LoRA the merged weight is weight + delta; DoRA rescales it (see its ``merged_difference``)."""
        return self.variants[adapter_name].delta_weight(self, adapter_name)

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """One adapter's parameters of this layer by key suffix (``lora_A.weight``, ``lora_B.weight``
        and the type's extra tensors), live (not copies)."""
        out = {"lora_A.weight": self.lora_A[adapter_name], "lora_B.weight": self.lora_B[adapter_name]}
        out.update(self.variants[adapter_name].parameters(self, adapter_name))
        return out

    def effective_scaling(self, adapter_name: str) -> float:
        """scaling * stack weight; exactly ``scaling`` when the stack weight is 1."""
        w = self.state.weight(adapter_name)
        s = self.scaling[adapter_name]
        return s if w == 1.0 else s * w

    # -- merge / unmerge (the ledger's, with each adapter type's merge step)
    def _deltas(self, adapter_names: Sequence[str]) -> list[ledger.MergeStep]:
        return [self.variants[n].merge_step(self, n) for n in adapter_names]

    def merged_weight(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """The current weight plus the named adapters' deltas (at their effective scaling), in a
        tensor that is not the live one, with peft's bits (:func:`ledger.merged_weight`)."""
        return ledger.merged_weight(self.base_layer.weight.detach(), self._deltas(adapter_names), self._buffers_cache)

    def commit_merge(self, adapter_names: Sequence[str], new_weight: torch.Tensor) -> None:
        """Make ``new_weight`` (from :meth:`merged_weight`) live; the original is kept for unmerge.
        Call it right after ``merged_weight``, on the same thread (:func:`ledger.commit_merge`)."""
        self._merge = ledger.commit_merge(self.base_layer.weight, self._merge, self._deltas(adapter_names), new_weight)
        self.merged_adapters.extend(adapter_names)

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight without merged deltas, keeping any edit made while merged (:func:`ledger.unmerged_weight`)."""
        return ledger.unmerged_weight(self.base_layer.weight, self._merge)

    def unmerge(self) -> None:
        """Put the original weight tensor back (bit-exact, idempotent); an edit made while merged is kept."""
        if self._merge is not None:
            with torch.inference_mode(False), torch.no_grad():  # an ordinary tensor, also inside inference_mode
                ledger.set_data(self.base_layer.weight, self.unmerged_weight())
            self._merge = None
        self.merged_adapters.clear()

    # -- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if state.disabled:
            if self._merge is not None:  # merged but switched off: the base weight
                return F.linear(x, self.unmerged_weight(), self.base_layer.bias)
            return self.base_layer(x)
        if state.mixed is not None:  # set for one call by serving.mixed_forward
            return self._forward_mixed(x, *state.mixed)
        active = [n for n in state.active if n in self.lora_A and n not in self.merged_adapters]
        if not active:
            return self.base_layer(x)
        exact = state.forward_mode == "exact" or self._needs_exact(active)
        layout = None if exact or not all(self.variants[n].fusable for n in active) else self._fused_layout()
        if layout is None or not fused.idle_rows_ok(layout, active, self.out_features):
            return self._forward_each(x, active, exact)
        w = self.base_layer.weight
        columns = [s for n in active for s in [self.effective_scaling(n)] * self.r[n]]  # each used column's scaling
        scale = torch.tensor(columns, dtype=w.dtype, device=w.device)  # (R_used,)
        return fused.fused_forward(layout, x, active, [self.lora_B[n] for n in active], scale)

    def _needs_exact(self, active: list[str]) -> bool:
        if self.training and any(self.lora_dropout[n] > 0 for n in active):
            return True
        base = self.base_layer
        if not fused.fused_supported(base.weight):  # float16/bfloat16: peft's ops (an adapter type's shortcut too)
            return True
        if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks:  # e.g. torch.nn.utils.prune
            return True
        return torch.is_grad_enabled() and (
            base.weight.requires_grad or any(t.requires_grad for n in active for t in self.adapter_tensors(n).values())
        )

    def _fused_layout(self) -> fused.FusedLayout | None:
        base = self.base_layer
        if not fused.fused_supported(base.weight):
            return None
        layout = fused.ensure_layout(self._layout, base.weight, base.bias, self.lora_A)
        if layout is not None:  # else plain tensors (functional_call): the old layout stays for later
            self._layout = layout
        return layout

    def _forward_each(self, x: torch.Tensor, active: list[str], exact: bool) -> torch.Tensor:
        """peft's order: the base output, then each active adapter's update in turn (its type's forward)."""
        result = self.base_layer(x)
        for name in active:
            result = self.variants[name].forward(self, name, x, result, exact)
        return result

    def _forward_mixed(self, x: torch.Tensor, n: int, blocks: list[tuple[str, int, int]]) -> torch.Tensor:
        """Rows ``start:stop`` through adapter ``name`` alone at its scaling, for each block; other rows
        through the bare base. Each block's update is added to its own rows only, in place.

        Raises:
            AdapterStateError: the layer's input does not hold one row per sample of the batch (a
                model that folds tokens into the batch dimension): rows and samples would not match.
        """
        if x.dim() == 0 or x.shape[0] != n:
            raise AdapterStateError(
                f"a mixed batch of {n} samples reached a LoRA layer as input of shape {tuple(x.shape)}: mixed batches need "
                "layers that see one row per sample along the first dimension; run each adapter's samples as their own batch"
            )
        result = self.base_layer(x)
        exact = self.state.forward_mode == "exact" or not fused.fused_supported(self.base_layer.weight)
        used = [(name, start, stop) for name, start, stop in blocks if name in self.lora_A and start != stop]
        grouped = [] if exact or result.dim() != 2 else [b for b in used if self.variants[b[0]].fusable]
        group = [(self.lora_A[n], self.lora_B[n], self.scaling[n], start, stop) for n, start, stop in grouped]
        if len(grouped) > 1 and _mixed_group_(result, x, group):  # plain-LoRA blocks: two GEMMs for all (the others below)
            used = [b for b in used if not self.variants[b[0]].fusable]
        for name, start, stop in used:
            self.variants[name].mixed_block_(self, name, result[start:stop], x[start:stop], exact)
        return result

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.lora_A)}"


def release_layer(layer: LoraLinear) -> nn.Linear:
    """The layer's ``base_layer``, handed back plain (on unload): the merge record and scratch
    dropped (a merged weight stays merged), edit tracking off, every parameter in its own storage."""
    layer._merge = None  # the merged weight stays
    layer._buffers_cache.clear()
    ledger.untrack_data_access(layer.base_layer.weight)
    fused.detach_layout([layer.base_layer.weight, layer.base_layer.bias, *layer.lora_A.values()])
    layer._layout = None
    return layer.base_layer

"""Native LoRA, from scratch in plain PyTorch (no ``peft`` import here).

The LoRA equation, for a linear layer with weight W (out, in) and bias b::

    y = x W^T + b + ((dropout(x) A^T) B^T) * scaling        A: (r, in), B: (out, r)
    scaling = lora_alpha / r        (or lora_alpha / sqrt(r) with rsLoRA)

Several adapters can live on one layer, held per name as in PEFT. Active adapters stack with
per-adapter weights w_i: y = x W^T + b + sum_i w_i * scaling_i * B_i A_i x.

State has one owner. The :class:`LoraModel` holds an :class:`AdapterState` (the active adapters,
their stack weights, the disable switch, the forward mode, a pending mixed batch) and every
:class:`LoraLinear` of the model reads that same object; a layer skips active names it does not
hold, so adapters on different subsets of layers work in every operation. What is merged is a
fact about each layer's weight, so each layer keeps its ``merged_adapters``; the model's list is
their union.

Two forward paths compute the same equation:
- *exact*: the same float operations, in the same order, as ``peft``'s LoRA layer (bit-identical
  outputs and gradients). Used whenever autograd is recording, with active dropout, for dtypes
  other than fp32/fp64, or when asked for with :func:`set_forward_mode`.
- *fused* (inference, :mod:`mnist_peft.tuners.lora.fused`): one GEMM over buffers the parameters live in, so
  no edit of any kind can leave it stale. It agrees with the exact path to float rounding (see
  ``peft_compat.FUSED_TOLERANCE``), not bit for bit.

Merge is out of place and the original weight tensor is kept, so ``unmerge`` restores the base
weight bit-exactly by putting that tensor back: no subtraction, no drift, any number of cycles. If
the merged weight was edited in place meanwhile, ``unmerge`` keeps the edit (as peft does, by
subtraction) instead of discarding it. Telling costs nothing when nothing touched the weight: a
base weight counts reads and writes of its ``.data`` (:class:`_TrackedParameter`) and its version
counter moves on every other in-place op; only when either moved is the merged weight recomputed
(bit for bit) and compared. Writes through raw memory (numpy) are not seen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.errors import (
    AdapterConfigError,
    AdapterKeyError,
    AdapterShapeError,
    AdapterStateError,
    InvalidArgumentError,
    MergeError,
    NonFiniteError,
)

from . import fused

__all__ = [
    "BASE_ADAPTER",
    "AdapterState",
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "compute_scaling",
    "get_delta_weight",
    "lora_forward",
    "init_lora_weights_",
    "inject_adapter",
    "check_lora_state_dict",
    "find_targets",
    "lora_layers",
    "valid_adapter_name",
    "set_forward_mode",
]

InitKind = bool | Literal["gaussian", "seed"]
DEFAULT_ADAPTER = "default"
BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


def _check_finite(value: object, what: str) -> float:
    """``value`` as a float; a named error if it is not a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapterConfigError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise AdapterConfigError(f"{what} must be finite, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- config
@dataclass
class LoraConfig:
    """LoRA hyper-parameters; fields mirror ``peft.LoraConfig`` where they overlap.

    Every field is type-checked (a config file is outside input): ``use_rslora: "false"`` is an
    error, not a truthy string.
    """

    r: int = 8
    """Rank of the update: ``lora_A`` is (r, in), ``lora_B`` is (out, r)."""
    lora_alpha: float = 8
    """Scale numerator: scaling = lora_alpha / r (or / sqrt(r) with ``use_rslora``)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input during training."""
    target_modules: list[str] = field(default_factory=lambda: ["linear1", "linear2", "linear3"])
    """Names (or name suffixes) of the ``nn.Linear`` modules to adapt."""
    use_rslora: bool = False
    """Rank-stabilised scaling lora_alpha / sqrt(r)."""
    init_lora_weights: InitKind = True
    """True: A kaiming-uniform(a=sqrt(5)), B zeros (peft's default); "gaussian": A ~ N(0, 1/r), B zeros;
    "seed": A ~ N(0, 1), B zeros (the seed notebook); False: A and B both random (non-zero)."""
    bias: str = "none"
    """Only "none" is supported: biases are never adapted."""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if not isinstance(self.target_modules, (list, tuple, set)) or not all(isinstance(t, str) and t for t in self.target_modules):
            raise AdapterConfigError(f"target_modules must be a list of module names, got {self.target_modules!r}")
        self.target_modules = sorted(set(self.target_modules))
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise AdapterConfigError(f"r must be a positive integer, got {self.r!r}")
        if _check_finite(self.lora_alpha, "lora_alpha") <= 0:
            raise AdapterConfigError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= _check_finite(self.lora_dropout, "lora_dropout") < 1.0:
            raise AdapterConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise AdapterConfigError(f"use_rslora must be true or false, got {self.use_rslora!r} ({type(self.use_rslora).__name__})")
        if not any(self.init_lora_weights is v for v in (True, False)) and self.init_lora_weights not in ("gaussian", "seed"):
            raise AdapterConfigError(f"init_lora_weights must be True, False, 'gaussian' or 'seed', got {self.init_lora_weights!r}")
        if self.bias != "none":
            raise AdapterConfigError(f"bias={self.bias!r} is not supported; use bias='none'")
        if not self.target_modules:
            raise AdapterConfigError("target_modules is empty; name at least one linear layer, e.g. ['linear1']")

    @property
    def scaling(self) -> float:
        return compute_scaling(self.r, self.lora_alpha, self.use_rslora)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# ----------------------------------------------------------------------------- pure math
def compute_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (the same float as peft)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def get_delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update ``(B @ A) * scaling``, (out, in); the same float ops as peft's (which, for
    float16/bfloat16 weights on CPU, computes in float32 and casts the result)."""
    if _delta_in_float32(lora_B):
        return ((lora_B.float() @ lora_A.float()) * scaling).to(lora_B.dtype)
    return (lora_B @ lora_A) * scaling


def _delta_in_float32(t: torch.Tensor) -> bool:
    """Whether peft computes the delta of weights like ``t`` in float32 (half precision on CPU)."""
    return t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)


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


# ----------------------------------------------------------------------------- the state
ForwardMode = Literal["auto", "exact"]


@dataclass
class AdapterState:
    """What a :class:`LoraModel` has chosen; one object shared by all its layers.

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


@dataclass(frozen=True)
class _Merged:
    """One delta merged into a weight, with what its bits depend on (so unmerge can recompute them)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    first: bool
    """The first of its merge call: ``W + delta`` into a fresh buffer (:func:`_weight_plus_delta_into`);
    else the delta added to the weight so far."""
    threads: int
    """torch's thread count then: a GEMM's rounding may depend on how its work is split."""


@dataclass
class _MergeRecord:
    """What a merged layer keeps to restore its base weight (see :meth:`LoraLinear.commit_merge`)."""

    original: torch.Tensor  # the base weight unmerge puts back
    source: torch.Tensor  # the weight the logged merges were applied to
    log: list[_Merged] = field(default_factory=list)  # each merged delta, in order
    token: tuple | None = None  # the live weight's edit token right after the last merge


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
        self.state = state if state is not None else AdapterState()
        self.merged_adapters: list[str] = []
        self._merge: _MergeRecord | None = None  # while merged: how to restore the base
        self._buffers_cache: dict[str, torch.Tensor] = {}  # reused scratch for merges
        _track_data_access(base_layer.weight)
        self._layout: fused.FusedLayout | None = None

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapters(self) -> list[str]:
        """The model's active adapters that this layer holds."""
        return [n for n in self.state.active if n in self.lora_A]

    # -- adapters
    def update_layer(self, adapter_name: str, config: LoraConfig, weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add (or re-create) adapter ``adapter_name``: fresh weights drawn per ``config``, or
        ``weights=(A, B)`` copied in (no random draws)."""
        w = self.base_layer.weight
        if weights is None:
            A = torch.empty(config.r, self.in_features, dtype=w.dtype, device=w.device)
            B = torch.empty(self.out_features, config.r, dtype=w.dtype, device=w.device)
            init_lora_weights_(A, B, config.init_lora_weights)
        else:
            A, B = (t.clone() if t.dtype == w.dtype and t.device == w.device else t.to(dtype=w.dtype, device=w.device) for t in weights)
        self.lora_A[adapter_name] = nn.Parameter(A)
        self.lora_B[adapter_name] = nn.Parameter(B)
        self.lora_dropout[adapter_name] = config.lora_dropout
        self.r[adapter_name] = config.r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.scaling

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise AdapterStateError(f"adapter {adapter_name!r} is merged; call unmerge() before deleting it")
        for d in (self.lora_A, self.lora_B):
            del d[adapter_name]
        for d in (self.lora_dropout, self.r, self.lora_alpha, self.scaling):
            d.pop(adapter_name, None)

    def effective_scaling(self, adapter_name: str) -> float:
        """scaling * stack weight; exactly ``scaling`` when the stack weight is 1."""
        w = self.state.weight(adapter_name)
        s = self.scaling[adapter_name]
        return s if w == 1.0 else s * w

    # -- merge / unmerge
    def merged_weight(self, adapter_names: Sequence[str]) -> torch.Tensor:
        """The current weight plus the named adapters' deltas, in a tensor that is not the live one.

        Each delta is :func:`get_delta_weight`'s float ops added to the weight, as peft merges, so
        a merged weight has the same bits as peft's. The live weight is never written. Scratch
        buffers are reused across merges (a fresh 8 MB tensor costs more in page faults than the
        merge itself); neither is ever the live weight.
        """
        weight = self.base_layer.weight.detach()
        out = self._scratch("merged", weight, avoid=weight)
        for i, name in enumerate(adapter_names):
            A, B, s = self.lora_A[name].detach(), self.lora_B[name].detach(), self.effective_scaling(name)
            delta = None if i == 0 else self._scratch("delta", weight, avoid=weight)
            _merge_step(out, weight, A, B, s, delta)
        return out

    def _scratch(self, key: str, like: torch.Tensor, *, avoid: torch.Tensor) -> torch.Tensor:
        """A reusable buffer like ``like`` -- reused only while nothing else holds its memory (a
        ``.data`` handle kept from an earlier merge must never alias a later live weight)."""
        buf = self._buffers_cache.get(key)
        reusable = (
            buf is not None
            and buf.shape == like.shape
            and buf.dtype == like.dtype
            and buf.device == like.device
            and buf.data_ptr() != avoid.data_ptr()
            and _sole_owner(buf)
        )
        if not reusable:
            buf = torch.empty_like(like, memory_format=torch.contiguous_format)
        self._buffers_cache[key] = buf
        return buf

    def commit_merge(self, adapter_names: Sequence[str], new_weight: torch.Tensor) -> None:
        """Make ``new_weight`` (from :meth:`merged_weight`) live; the original is kept for unmerge.

        What unmerge needs to tell an edit made while merged is recorded, not copied: the weight
        the merges started from, each merged ``(A, B, scaling)`` (small) with how it was merged
        (torch's thread count is read here: call this right after ``merged_weight``, on the same
        thread, as :meth:`LoraModel.merge` does), and the live parameter's edit token
        (:func:`_edit_token`).
        """
        weight = self.base_layer.weight
        record = self._merge
        with torch.no_grad():
            if record is None or not self._unedited():
                # First merge, or merging more after an edit: restart the record from the live weight.
                original = weight.detach() if record is None else self.unmerged_weight()
                record = _MergeRecord(original=original, source=weight.detach())
            threads = torch.get_num_threads()
            record.log += [
                _Merged(self.lora_A[n].detach().clone(), self.lora_B[n].detach().clone(), self.effective_scaling(n), i == 0, threads)
                for i, n in enumerate(adapter_names)
            ]
            fused.set_data(weight, new_weight)
        record.token = _edit_token(weight)
        self._merge = record
        self.merged_adapters.extend(adapter_names)

    def _unedited(self) -> bool:
        """Whether the live weight is still, provably, what the merges wrote (no access since)."""
        return self._merge is not None and self._merge.token is not None and self._merge.token == _edit_token(self.base_layer.weight)

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight without merged deltas: the kept original, plus any in-place edit made
        to the merged weight since (``live - merged``, i.e. peft's ``live - delta``).

        When the live weight was touched (its version moved, or ``.data`` was read or set), the
        merged weight is recomputed from the record, bit for bit as merge made it, and compared.
        """
        live = self.base_layer.weight.detach()
        record = self._merge
        if record is None:
            return live
        if self._unedited():
            return record.original
        merged = record.source
        for m in record.log:  # merged_weight's steps, on as many threads: the same bits
            with _num_threads(m.threads, merged.device):
                if m.first:
                    merged = _merge_step(torch.empty_like(merged, memory_format=torch.contiguous_format), merged, m.A, m.B, m.scaling)
                else:  # added in place: never to the record's own weight
                    merged = merged.clone() if merged is record.source else merged
                    merged = _merge_step(merged, merged, m.A, m.B, m.scaling, torch.empty_like(merged))
        if live.dtype == merged.dtype and live.device == merged.device and torch.equal(live, merged):
            return record.original
        original = record.original.to(dtype=live.dtype, device=live.device)
        edit = live - merged.to(dtype=live.dtype, device=live.device)
        return torch.where(edit == 0, original, original + edit)  # unedited entries keep their bits (-0.0 too)

    def unmerge(self) -> None:
        """Put the original weight tensor back (bit-exact, idempotent); an edit made while merged is kept."""
        if self._merge is not None:
            with torch.no_grad():
                fused.set_data(self.base_layer.weight, self.unmerged_weight())
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
        layout = None if state.forward_mode == "exact" or self._needs_exact(active) else self._fused_layout()
        if layout is None or not fused.idle_rows_ok(layout, active, self.out_features):
            return self._forward_exact(x, active)
        scale = self._column_scale(active, {n: self.effective_scaling(n) for n in active})
        return fused.fused_forward(layout, x, active, [self.lora_B[n] for n in active], scale)

    def _needs_exact(self, active: list[str]) -> bool:
        if self.training and any(self.lora_dropout[n] > 0 for n in active):
            return True
        base = self.base_layer
        if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks:  # e.g. torch.nn.utils.prune
            return True
        return torch.is_grad_enabled() and (
            base.weight.requires_grad or any(self.lora_A[n].requires_grad or self.lora_B[n].requires_grad for n in active)
        )

    def _fused_layout(self) -> fused.FusedLayout | None:
        if not fused.fused_supported(self.base_layer.weight):
            return None
        return fused.ensure_layout(self)

    def _column_scale(self, used: list[str], scales: dict[str, float]) -> torch.Tensor:
        """(R_used,) the scaling of each used adapter's columns."""
        w = self.base_layer.weight
        return torch.tensor([scales[n] for n in used for _ in range(self.r[n])], dtype=w.dtype, device=w.device)

    def _dropout(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """What ``nn.Dropout(p)`` would do (identity at p = 0, as peft's ``nn.Identity``)."""
        p = self.lora_dropout[name]
        return F.dropout(x, p, self.training) if p > 0 else x

    def _forward_exact(self, x: torch.Tensor, active: list[str]) -> torch.Tensor:
        result = self.base_layer(x)
        for name in active:
            result = result + lora_forward(self._dropout(name, x), self.lora_A[name], self.lora_B[name], self.effective_scaling(name))
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
        exact = self.state.forward_mode == "exact"
        for name, start, stop in blocks:
            if name not in self.lora_A or start == stop:
                continue
            A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
            rows = x[start:stop]
            if exact or result.dim() != 2:  # peft's ops on the block (its mixed batches do the same)
                result[start:stop] += lora_forward(rows, A, B, s)
            else:  # (s x A^T) B^T added in place by one rank-r GEMM
                result[start:stop].addmm_((rows @ A.t()).mul_(s), B.t())
        return result

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.lora_A)}"


def _merge_step(
    out: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, delta: torch.Tensor | None = None
) -> torch.Tensor:
    """One adapter merged, as a merge call does it (and unmerge replays it): the call's first adapter
    (``delta`` None) as ``weight + delta`` into ``out``; each later one's delta computed into ``delta``
    and added to ``out`` in place (``out`` then already holds the weight so far)."""
    if delta is None:
        return _weight_plus_delta_into(out, weight, A, B, s)
    return out.add_(_delta_weight_into(delta, A, B, s))


def _weight_plus_delta_into(out: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """``weight + (B @ A) * s`` written into ``out`` (not ``weight``), with the bits of peft's merge:
    the delta rounded, then added. One ``addmm`` pass over the weight where this BLAS is seen to
    round exactly so for these shapes and strides (:func:`_addmm_is_two_step`); else a GEMM into
    ``out`` and an add, two passes."""
    if _is_power_of_two(s) and out.dtype in (torch.float32, torch.float64) and out.numel() >= _ADDMM_MIN_NUMEL:
        sB = B if s == 1.0 else B * s
        if _addmm_is_two_step(out, weight, sB, A):
            return torch.addmm(weight, sB, A, out=out)
    return _delta_weight_into(out, A, B, s).add_(weight)  # fl(delta + W) == fl(W + delta)


_ADDMM_MIN_NUMEL = 4096
"""Smaller weights always take the two-step merge: on a few values a kernel that rounds otherwise
could agree with it by chance (and one pass saves nothing there)."""


@contextlib.contextmanager
def _num_threads(n: int, device: torch.device) -> Iterator[None]:
    """Run with torch's intra-op thread count at ``n`` (as it was when a merge ran), then restore it.

    Only for CPU work, and only for the rare recomputation of a touched merged weight: the count is
    process-wide, so a thread that starts torch work meanwhile starts with ``n``."""
    now = torch.get_num_threads()
    if n == now or device.type != "cpu":
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(now)


_ADDMM_TWO_STEP: dict[tuple, bool] = {}


def _addmm_is_two_step(out: torch.Tensor, weight: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether ``torch.addmm(weight, B, A, out=out)`` rounds as ``matmul(B, A, out=out).add_(weight)``
    does (product rounded, then the sum) for operands of these shapes, strides, dtype and device.

    A GEMM's rounding depends on the kernel the BLAS picks (by shape, strides, dtype, CPU and
    thread count), not on the values: a kernel that adds ``W`` after its products round gives the
    two-step bits, one that starts its sums from ``W`` (or fuses the add) does not. Which one this
    is gets probed once per such key on random operands with the same layout (millions of values:
    a kernel that rounds otherwise differs in about half of them) and remembered.
    """
    key = (
        tuple(out.shape),
        out.stride(),
        weight.stride(),
        B.shape[1],
        B.stride(),
        A.stride(),
        out.dtype,
        weight.dtype,
        B.dtype,
        A.dtype,
        out.device,
        torch.get_num_threads(),
    )
    known = _ADDMM_TWO_STEP.get(key)
    if known is None:
        g = torch.Generator().manual_seed(0)

        def like(t: torch.Tensor, scale: float) -> torch.Tensor:
            # drawn in float64, so that no dtype's products come out exact (which would hide a fused rounding)
            x = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
            return x.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64) * scale)

        w, b, a = like(weight, 0.05), like(B, 0.1), like(A, 0.1)
        one = torch.addmm(w, b, a, out=torch.empty_strided(out.size(), out.stride(), dtype=out.dtype, device=out.device))
        two = torch.matmul(b, a, out=torch.empty_strided(out.size(), out.stride(), dtype=out.dtype, device=out.device)).add_(w)
        known = _ADDMM_TWO_STEP[key] = bool(torch.equal(one, two))
    return known


def _delta_weight_into(out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """:func:`get_delta_weight` (``(B @ A) * s``, peft's bits) written into ``out``, (out, in)."""
    if _delta_in_float32(out):  # as peft: in float32, the result cast
        return out.copy_(_delta_weight_into(torch.empty(out.shape, dtype=torch.float32), A.float(), B.float(), s))
    if _is_power_of_two(s) and out.dtype in (torch.float32, torch.float64):
        # Scaling by 2^k commutes with rounding, so (s B) @ A has the bits of (B @ A) * s and
        # saves a pass over the (out, in) delta. (s == 1 is the common case.) Not in half
        # precision: its subnormals start at 6e-5, where scaling loses bits.
        return torch.matmul(B if s == 1.0 else B * s, A, out=out)
    return torch.matmul(B, A, out=out).mul_(s)


def _sole_owner(t: torch.Tensor) -> bool:
    """Whether ``t`` is the only tensor using its memory (no view, no ``.data`` handle elsewhere)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # a torch without the query: never reuse
        return False
    storage = t.untyped_storage()
    return use_count(storage._cdata) <= 2  # t itself and the `storage` object just made


def _is_power_of_two(s: float) -> bool:
    m, _ = math.frexp(s)
    return s > 0 and m == 0.5 and s >= 2.0**-100  # far from the subnormal range of the products


class _TrackedParameter(nn.Parameter):
    """An ``nn.Parameter`` that counts reads and writes of ``.data`` and switches to trainable.

    An in-place edit through ``p.data`` (``p.data.add_(1)``, common in PEFT code) leaves no trace
    on ``p._version``: ``.data`` hands out a tensor with a version counter of its own. Fused
    optimizers (``Adam(fused=True)``) step without bumping it either, but only a parameter that
    requires grad is stepped. Counting both closes those gaps for unmerge's edit check; a count
    that moved without an edit only sends unmerge down its slower, still exact, path. Not seen:
    writes through raw memory (numpy on ``p.detach().numpy()``). The class is set on a base weight
    when it is wrapped and taken back off when the model is unloaded; identity, optimizers and
    ``isinstance`` are unaffected.
    """

    def _touch(self) -> None:
        self.__dict__["touches"] = self.__dict__.get("touches", 0) + 1

    @property
    def data(self) -> torch.Tensor:  # type: ignore[override]
        self._touch()
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        self._touch()
        fused.set_data(self, value)

    @property
    def requires_grad(self) -> bool:  # type: ignore[override]
        return torch._C.TensorBase.requires_grad.__get__(self)

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if value:
            self._touch()
        torch._C.TensorBase.requires_grad.__set__(self, value)

    def requires_grad_(self, requires_grad: bool = True) -> _TrackedParameter:
        if requires_grad:
            self._touch()
        return super().requires_grad_(requires_grad)


def _track_data_access(p: torch.Tensor) -> None:
    if type(p) is nn.Parameter:
        p.__class__ = _TrackedParameter


def _untrack_data_access(p: torch.Tensor) -> None:
    if type(p) is _TrackedParameter:
        p.__class__ = nn.Parameter


def _edit_token(p: torch.Tensor) -> tuple | None:
    """What changes whenever ``p`` may have been edited in place (None: cannot tell, assume so).

    A weight that requires grad or holds a gradient may be stepped by an optimizer that leaves no
    trace, so it has no token.
    """
    if type(p) is not _TrackedParameter or p.requires_grad or p.grad is not None:
        return None
    return (id(p), p._version, p.__dict__.get("touches", 0))


# ----------------------------------------------------------------------------- injection
def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` order (pre-order, each module once), without descending into a
    :class:`LoraLinear`: its children (base layer, LoRA weights, dropout) are never targets, and
    skipping them makes the walk several times cheaper (loading an adapter walks the model)."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if module._modules and not isinstance(module, LoraLinear):
            prefix = f"{name}." if name else ""
            stack.extend((prefix + k, m) for k, m in reversed(module._modules.items()) if m is not None)


def _target_modules(model: nn.Module, config: LoraConfig, lora: list[LoraLinear] | None = None) -> dict[str, nn.Linear | LoraLinear]:
    """``{name: module}`` of the target layers in module order (see :func:`find_targets`); every
    :class:`LoraLinear` met on the way is appended to ``lora`` (one walk serves both)."""
    found: dict[str, nn.Linear | LoraLinear] = {}
    hit: set[str] = set()
    plain = {t for t in config.target_modules if "." not in t}  # matched by a name's last part
    dotted = [t for t in config.target_modules if "." in t]
    for name, module in _walk(model):
        if lora is not None and isinstance(module, LoraLinear):
            lora.append(module)
        last = name.rpartition(".")[2]
        matched = [last] if last in plain else []
        if dotted:
            matched += [t for t in dotted if name == t or name.endswith("." + t)]
        if not matched:
            continue
        if not isinstance(module, (nn.Linear, LoraLinear)):
            raise AdapterConfigError(
                f"target module {name!r} is a {type(module).__name__}, not nn.Linear; LoRA here adapts linear layers only"
            )
        found[name] = module
        hit.update(matched)
    missing = [t for t in config.target_modules if t not in hit]
    if missing:
        linear = [n for n, m in _walk(model) if isinstance(m, (nn.Linear, LoraLinear))]
        raise AdapterConfigError(f"target module(s) {missing} not found in {type(model).__name__}; its linear layers are {linear}")
    return found


def find_targets(model: nn.Module, config: LoraConfig) -> dict[str, tuple[int, int]]:
    """``{module name: (out_features, in_features)}`` of the target linear layers, in module order.

    Raises:
        AdapterConfigError: a target module is missing or not an ``nn.Linear``.
    """
    return {name: (m.out_features, m.in_features) for name, m in _target_modules(model, config).items()}


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


def _check_fits_dtypes(state_dict: dict[str, torch.Tensor], modules: dict[str, nn.Linear | LoraLinear], path: str | None) -> None:
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


def inject_adapter(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = DEFAULT_ADAPTER,
    *,
    state_dict: dict[str, torch.Tensor] | None = None,
    state: AdapterState | None = None,
    source: str | None = None,
) -> list[str]:
    """Wrap every target ``nn.Linear`` of ``model`` in a :class:`LoraLinear` and add an adapter.

    Layers already wrapped get the new adapter added. Targets are visited in ``named_modules``
    order (as peft does), so seeded inits match peft's. With ``state_dict`` the weights are
    checked first (nothing changes if they do not fit) and copied in. New layers share ``state``
    (default: the state of the model's existing LoRA layers, else a new one); ``source`` names where
    ``state_dict`` came from, in error messages. Returns the adapted names.

    Raises:
        AdapterConfigError, AdapterKeyError, AdapterShapeError, NonFiniteError: see :func:`check_lora_state_dict`.
    """
    if not valid_adapter_name(adapter_name):
        raise AdapterStateError(f"adapter name {adapter_name!r} is not allowed; see valid_adapter_name()")
    return _inject(model, _target_modules(model, config), config, adapter_name, state_dict=state_dict, state=state, source=source)


def _inject(
    model: nn.Module,
    modules: dict[str, nn.Linear | LoraLinear],
    config: LoraConfig,
    adapter_name: str,
    *,
    state_dict: dict[str, torch.Tensor] | None,
    state: AdapterState | None,
    source: str | None,
) -> list[str]:
    if state_dict is not None:
        check_lora_state_dict(
            model, config, state_dict, path=source, targets={n: (m.out_features, m.in_features) for n, m in modules.items()}
        )
        _check_fits_dtypes(state_dict, modules, source)
    if state is None:
        state = next((layer.state for _, layer in lora_layers(model)), None) or AdapterState()
    for name, module in modules.items():
        layer = module
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(module, state)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        pair = None if state_dict is None else (state_dict[f"{name}.lora_A.weight"], state_dict[f"{name}.lora_B.weight"])
        layer.update_layer(adapter_name, config, pair)
    return list(modules)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear]]:
    """``(name, layer)`` for every :class:`LoraLinear` in ``model``."""
    for name, module in _walk(model):
        if isinstance(module, LoraLinear):
            yield name, module


def set_forward_mode(model: nn.Module, mode: ForwardMode) -> None:
    """``"exact"``: always peft's float ops; ``"auto"``: the fused path for inference."""
    if mode not in ("auto", "exact"):
        raise InvalidArgumentError(f"forward mode must be 'auto' or 'exact', got {mode!r}")
    for _, layer in lora_layers(model):
        layer.state.forward_mode = mode


# ----------------------------------------------------------------------------- the model
class LoraModel(nn.Module):
    """A base model with named LoRA adapters: add, activate, stack, merge, unmerge, unload.

    The model owns the adapter state (:class:`AdapterState`); its layers read it. Adapters may sit
    on different subsets of the target layers: every operation takes each layer's share.

    Example:
        >>> model = LoraModel(MnistMLP(), LoraConfig(r=4, lora_alpha=4))
        >>> model.merge(); model.unmerge()   # the base weight comes back bit-exactly
        >>> plain = model.merge_and_unload()  # a plain MnistMLP again
    """

    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = DEFAULT_ADAPTER) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        existing = [layer for _, layer in lora_layers(model)]
        self.state = existing[0].state if existing else AdapterState()
        for layer in existing:
            layer.state = self.state
        for p in model.parameters():  # only LoRA weights train
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)

    # -- bookkeeping
    def _layers(self) -> list[LoraLinear]:
        return [layer for _, layer in lora_layers(self.model)]

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters, in stack order (a copy)."""
        return list(self.state.active)

    @property
    def adapter_weights(self) -> dict[str, float]:
        """The stack weight of each active adapter (a copy)."""
        return {n: self.state.weight(n) for n in self.state.active}

    @property
    def merged_adapters(self) -> list[str]:
        """Adapters merged into at least one layer's weight (the union over layers, in merge order)."""
        seen: list[str] = []
        for layer in self._layers():
            seen += [n for n in layer.merged_adapters if n not in seen]
        return seen

    def _any_merged(self) -> bool:
        return any(layer.merged_adapters for _, layer in lora_layers(self.model))

    def require_adapters(self, names: Iterable[str]) -> None:
        """Raise :class:`AdapterStateError` naming the first of ``names`` that is not loaded."""
        for n in names:
            if n not in self.peft_config:
                raise AdapterStateError(f"no adapter named {n!r}; adapters here: {sorted(self.peft_config)}")

    # -- adapters
    def add_adapter(
        self, adapter_name: str, config: LoraConfig, *, state_dict: dict[str, torch.Tensor] | None = None, source: str | None = None
    ) -> None:
        """Add a new adapter, with fresh weights or ``state_dict``'s; the first one added becomes active.

        ``source`` names where ``state_dict`` came from (a file), for error messages.

        Raises:
            AdapterStateError: the name is taken or reserved, or adapters are merged.
            AdapterConfigError, AdapterKeyError, AdapterShapeError, NonFiniteError: ``state_dict``
                does not fit (the model is left unchanged).
        """
        if not valid_adapter_name(adapter_name):
            raise AdapterStateError(
                f"adapter name {adapter_name!r} is not allowed; use a non-empty name without '.' that does not start with '_', "
                f"other than {BASE_ADAPTER!r} and the attribute names of a parameter dict ('keys', 'training', ...)"
            )
        if adapter_name in self.peft_config:
            raise AdapterStateError(f"adapter {adapter_name!r} already exists; delete_adapter() it or pick another name")
        lora: list[LoraLinear] = []
        modules = _target_modules(self.model, config, lora)
        if any(layer.merged_adapters for layer in lora):
            raise AdapterStateError("cannot add an adapter while adapters are merged; call unmerge() first")
        _inject(self.model, modules, config, adapter_name, state_dict=state_dict, state=self.state, source=source)
        self.peft_config[adapter_name] = config  # its weights are new Parameters, trainable
        if not self.state.active:  # what set_adapter(adapter_name) does; its checks were just made
            self.state.active, self.state.weights = [adapter_name], {adapter_name: 1.0}

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter from every layer (refused while it is merged)."""
        self.require_adapters([adapter_name])
        layers = [layer for layer in self._layers() if adapter_name in layer.lora_A]
        if any(adapter_name in layer.merged_adapters for layer in layers):
            raise AdapterStateError(f"adapter {adapter_name!r} is merged; call unmerge() before deleting it")
        for layer in layers:
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if adapter_name in self.state.active:
            self.state.active = [n for n in self.state.active if n != adapter_name]
            self.state.weights.pop(adapter_name, None)

    def set_adapter(self, adapter_names: str | Sequence[str], weights: Sequence[float] | None = None) -> None:
        """Activate one adapter, or a stack of several with optional per-adapter weights (default 1).

        Raises:
            AdapterStateError: an unknown or repeated name, a weight count that does not match,
                or merged adapters.
            AdapterConfigError: a weight that is not a finite number.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.require_adapters(names)
        if len(set(names)) != len(names):
            raise AdapterStateError(f"adapter names {names} repeat a name; give each adapter once (use its weight to scale it)")
        if weights is not None and len(weights) != len(names):
            raise AdapterStateError(f"got {len(weights)} weights for {len(names)} adapters; give one weight per adapter")
        values = (
            [1.0] * len(names)
            if weights is None
            else [_check_finite(w, f"stack weight of {n!r}") for n, w in zip(names, weights, strict=True)]
        )
        if self._any_merged():
            raise AdapterStateError("cannot change the active adapters while merged; call unmerge() first")
        self.state.active = names
        self.state.weights = dict(zip(names, values, strict=True))

    def enable_adapter_layers(self) -> None:
        self.state.disabled = False

    def disable_adapter_layers(self) -> None:
        """The seed's switch: the model computes the bare base (merged or not), nothing is lost."""
        self.state.disabled = True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """``with model.disable_adapter(): ...`` runs the bare base model."""
        was = self.state.disabled
        self.state.disabled = True
        try:
            yield
        finally:
            self.state.disabled = was

    # -- merge
    def merge(self, adapter_names: Sequence[str] | None = None, *, safe_merge: bool = False) -> None:
        """Add the (active, or named) adapters' deltas into the base weights of the layers holding them.

        Idempotent: adapters already merged are skipped. With ``safe_merge``, every new weight is
        checked for NaN/Inf first and nothing changes if one is found.

        Raises:
            MergeError: ``safe_merge`` found a non-finite merged weight (the model is untouched).
        """
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        self.require_adapters(names)
        if len(set(names)) != len(names):
            raise AdapterStateError(f"adapter names {names} repeat a name; merge each adapter once")
        plan = []
        for lname, layer in lora_layers(self.model):
            todo = [n for n in names if n in layer.lora_A and n not in layer.merged_adapters]
            if todo:
                plan.append((lname, layer, todo, layer.merged_weight(todo)))
        if safe_merge:
            for lname, _, todo, weight in plan:
                if not torch.isfinite(weight).all():
                    raise MergeError(
                        f"merging adapter(s) {todo} into {lname!r} gives NaN/Inf weights; the model was left "
                        "unchanged. Check the adapter's weights (or lower its stack weight)"
                    )
        for _, layer, todo, weight in plan:
            layer.commit_merge(todo, weight)

    def unmerge(self) -> None:
        """Restore every base weight bit-exactly (keeping edits made while merged); idempotent."""
        for layer in self._layers():
            layer.unmerge()

    def _unwrap(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        if merge:
            self.merge(safe_merge=safe_merge)
        for name, layer in list(lora_layers(self.model)):
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            layer._merge = None  # the merged weight stays
            layer._buffers_cache.clear()
            _untrack_data_access(layer.base_layer.weight)
            fused.detach_layout(layer)
            setattr(parent, child, layer.base_layer)
        self.peft_config.clear()
        self.state.active, self.state.weights = [], {}
        return self.model

    def merge_and_unload(self, *, safe_merge: bool = False) -> nn.Module:
        """Merge the active adapters and return the plain base model (e.g. an ``MnistMLP``).

        Raises:
            MergeError: ``safe_merge`` found a non-finite merged weight (the model is untouched).
        """
        return self._unwrap(merge=True, safe_merge=safe_merge)

    def unload(self) -> nn.Module:
        """Drop every adapter (unmerging first) and return the plain base model."""
        self.unmerge()
        return self._unwrap(merge=False)

    # -- state
    def lora_state_dict(self, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
        """``{"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)}`` for one adapter."""
        self.require_adapters([adapter_name])
        out: dict[str, torch.Tensor] = {}
        for name, layer in lora_layers(self.model):
            if adapter_name in layer.lora_A:
                # Copies: lora_A is a view into the fused buffers, which hold the base weight and
                # the other adapters too (torch.save of a view writes its whole storage).
                out[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].detach().clone()
                out[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].detach().clone()
        return out

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The bare base's tensors under their plain names, with unmerged weights."""
        state = {k.replace("base_layer.", ""): v for k, v in self.model.state_dict().items() if "lora_" not in k}
        for name, layer in lora_layers(self.model):
            state[f"{name}.weight"] = layer.unmerged_weight()
        return state

    def base_fingerprint(self) -> str:
        """:func:`mnist_peft.model.mlp.base_fingerprint` of the bare base, computed now (never cached:
        an in-place edit through ``.data`` leaves no trace a cache could key on)."""
        from mnist_peft.model.mlp import base_fingerprint

        return base_fingerprint(self.base_state_dict())

    def num_lora_parameters(self, adapter_name: str = DEFAULT_ADAPTER) -> int:
        return sum(t.numel() for t in self.lora_state_dict(adapter_name).values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

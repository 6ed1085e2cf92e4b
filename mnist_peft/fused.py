"""The inference fast path of a LoRA layer: one GEMM for the base output and every adapter's
``x A^T``, then the low-rank update added in place. It keeps no cached values, so it cannot go stale.

How (the contract):

- The layer's parameters *live in* three buffers this module owns (a :class:`FusedLayout`)::

      wa    (out + R', in)  [W; A_1; ...; A_k; 0]    W = wa[:out], A_i = a block of rows
      bias  (out + R',)     [b; 0]                   b = bias[:out]      (absent without a bias)
      b_cat (out, R)        [B_1 | ... | B_k]        B_i = a block of columns

  (R' pads R so that out + R' is a multiple of 8: a GEMM 2,004 columns wide runs ~11% slower
  than one 2,008 wide, measured here with MKL.) Each parameter's ``.data`` is a view into its
  buffer, and every view is row-major (``B_i`` with a row stride of R), so BLAS reads it in place
  with the same kernel as a compact tensor: the exact path keeps peft's bits. An in-place edit by
  any route (``p.data.mul_(10)``, ``p.add_(1)`` under ``no_grad``, an optimizer step, numpy on
  ``p.detach()``) writes the buffer itself, so the next forward computes with it: there is
  nothing to invalidate.
- Before every use :meth:`FusedLayout.matches` checks that each parameter still *is* its view:
  same storage address, shape, strides, dtype and device, and the layer holds exactly the
  adapters the layout was built for. Anything else (``p.data = other``, ``model.to(...)``, an
  adapter added or deleted, ``copy.deepcopy``) fails the check, and :func:`ensure_layout` builds a
  new layout from the parameters' current values and re-points them into it.
- Scalings, stack weights and which adapters are active are never in the buffers: each forward
  passes them as a column scale, (R,) or (N, R) for per-sample adapters, with zeros on the
  columns of adapters that must not count (inactive or merged). So changing them needs no rebuild.

Numerics: the sums are reordered (one GEMM over ``[W; A]``, an in-place ``addmm_``), so the result
agrees with the exact path (peft's op order) to float rounding, not bit for bit; the bound is
``peft_compat.FUSED_TOLERANCE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .lora import LoraLinear

__all__ = ["FusedLayout", "set_data", "ensure_layout", "detach_layout", "fused_supported", "fused_forward", "idle_rows_ok", "MAX_IDLE_ROWS"]

# An adapter that is loaded but not active still costs its rows of A in the one GEMM. Above this
# many idle rows (or a quarter of the layer's outputs, whichever is larger) the exact path, which
# computes only the active adapters, is cheaper.
MAX_IDLE_ROWS = 64
ROW_MULTIPLE = 8


def set_data(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p.data = value``, as this package's own re-pointing (not counted as a user's edit)."""
    torch._C.TensorBase.data.__set__(p, value)


def fused_supported(weight: torch.Tensor) -> bool:
    """The fused path is for dense fp32/fp64 weights; anything else takes the exact path."""
    return weight.dtype in (torch.float32, torch.float64) and weight.layout == torch.strided


def _signature(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


@dataclass
class FusedLayout:
    """The buffers one :class:`~mnist_peft.lora.LoraLinear`'s parameters are views of."""

    wa: torch.Tensor  # (out + R', in), R' >= R
    bias: torch.Tensor | None  # (out + R',)
    b_cat: torch.Tensor  # (out, R)
    names: tuple[str, ...]  # adapters, in column order
    columns: dict[str, slice]  # adapter -> its columns in [0, R)
    signatures: tuple  # what each parameter must look like for the layout to hold

    @property
    def rank(self) -> int:
        return self.b_cat.shape[1]

    def matches(self, layer: LoraLinear) -> bool:
        """Whether every parameter of ``layer`` is still exactly its view into these buffers."""
        return tuple(layer.lora_A) == self.names and _layer_signatures(layer) == self.signatures

    def column_scale(self, scales: dict[str, float]) -> torch.Tensor:
        """(R,) scale per column: ``scales[name]`` on that adapter's columns, 0 where absent."""
        values = [scales.get(name, 0.0) for name in self.names for _ in range(self.columns[name].stop - self.columns[name].start)]
        return torch.tensor(values, dtype=self.wa.dtype, device=self.wa.device)


def _layer_signatures(layer: LoraLinear) -> tuple:
    base = layer.base_layer
    sigs = [_signature(base.weight), None if base.bias is None else _signature(base.bias)]
    for name in layer.lora_A:
        sigs += [_signature(layer.lora_A[name]), _signature(layer.lora_B[name])]
    return tuple(sigs)


def ensure_layout(layer: LoraLinear) -> FusedLayout:
    """The layer's layout, rebuilt from its parameters' current values if any no longer matches."""
    layout = layer._layout
    if layout is not None and layout.matches(layer):
        return layout
    layout = _build(layer)
    layer._layout = layout
    return layout


def _build(layer: LoraLinear) -> FusedLayout:
    base = layer.base_layer
    w = base.weight
    names = tuple(layer.lora_A)
    ranks = [layer.lora_A[n].shape[0] for n in names]
    out, rank = w.shape[0], sum(ranks)
    # Plain tensors even when the first forward runs under inference_mode: the parameters are
    # re-pointed into these buffers and must stay usable for training afterwards.
    with torch.inference_mode(False), torch.no_grad():
        rows = -(-(out + rank) // ROW_MULTIPLE) * ROW_MULTIPLE
        wa = torch.zeros(rows, w.shape[1], dtype=w.dtype, device=w.device)
        b_cat = torch.empty(out, rank, dtype=w.dtype, device=w.device)
        wa[:out].copy_(w)
        columns: dict[str, slice] = {}
        start = out
        for name, r in zip(names, ranks, strict=True):
            columns[name] = slice(start - out, start - out + r)
            wa[start : start + r].copy_(layer.lora_A[name])
            b_cat[:, start - out : start - out + r].copy_(layer.lora_B[name])
            start += r
        bias = None
        if base.bias is not None:
            bias = torch.zeros(rows, dtype=w.dtype, device=w.device)
            bias[:out].copy_(base.bias)
        # Re-point every parameter into the buffers (same Parameter objects: optimizers keep them).
        # The content is copied exactly, so this is no edit: set_data leaves the edit count alone.
        set_data(w, wa[:out])
        if bias is not None:
            set_data(base.bias, bias[:out])
        for name in names:
            cols = columns[name]
            set_data(layer.lora_A[name], wa[out + cols.start : out + cols.stop])
            set_data(layer.lora_B[name], b_cat[:, cols])
    return FusedLayout(wa, bias, b_cat, names, columns, _layer_signatures(layer))


def detach_layout(layer: LoraLinear) -> None:
    """Give every parameter its own compact storage again and drop the layout (on unload)."""
    with torch.no_grad():
        params = [layer.base_layer.weight, layer.base_layer.bias, *layer.lora_A.values(), *layer.lora_B.values()]
        for p in params:
            if p is not None:
                set_data(p, p.detach().clone(memory_format=torch.contiguous_format))
    layer._layout = None


def idle_rows_ok(layout: FusedLayout, active: Sequence[str], out_features: int) -> bool:
    """Whether the rows of loaded-but-unused adapters are few enough for the fused GEMM to pay."""
    used = sum(layout.columns[n].stop - layout.columns[n].start for n in active)
    return layout.rank - used <= max(MAX_IDLE_ROWS, out_features // 4)


def fused_forward(layout: FusedLayout, x: torch.Tensor, column_scale: torch.Tensor) -> torch.Tensor:
    """``x W^T + b + sum_i s_i (x A_i^T) B_i^T`` with ``column_scale`` (R,) or (N, R) holding the s_i.

    One GEMM against ``[W; A_1; ...]`` gives the base output and all low-rank activations; they are
    scaled per column and one small GEMM adds ``(x A^T) B^T`` in place into the base output.
    """
    out, rank = layout.b_cat.shape
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    weight_t = layout.wa.t()  # (in, out + R')
    y = x2 @ weight_t if layout.bias is None else torch.addmm(layout.bias, x2, weight_t)  # (N, out + R')
    result = y[:, :out]  # (N, out) view, row stride out + R'
    low = y[:, out : out + rank] * column_scale  # (N, R): s_i x A_i^T, zero on columns that do not count
    result.addmm_(low, layout.b_cat.t())  # += (s x A^T) B^T, in place
    return result.reshape(*shape, out)

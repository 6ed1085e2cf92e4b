"""The inference fast path of a LoRA layer: one GEMM for the base output and every adapter's
``x A^T``, then the low-rank update added in place. It keeps no cached values, so it cannot go stale.

How (the contract):

- The layer's base weight and bias *live in* two buffers this module owns (a
  :class:`FusedLayout`), which also hold a copy of every ``A_i``::

      wa    (out + R', in)  [W; A_1; ...; A_k; 0]    W = wa[:out], A_i copied into a block of rows
      bias  (out + R',)     [b; 0]                   b = bias[:out]      (absent without a bias)

  (R' pads R so that out + R' is a multiple of 8: a GEMM 2,004 columns wide runs ~11% slower
  than one 2,008 wide, measured here with MKL.) W's and b's ``.data`` are compact views into
  their buffers, so an in-place edit by any route (``p.data.mul_(10)``, ``p.add_(1)`` under
  ``no_grad``, an optimizer step, numpy on ``p.detach()``) writes the buffer itself, and the next
  forward computes with it: there is nothing to invalidate. The ``A_i`` keep their own storage (a
  user's ``torch.save`` of an A writes its r x in values, not the base weight with it) and are
  copied into their rows on every call (r x in values each, a few microseconds), so an edit of an
  A by any route is seen too. The small ``B_i`` keep their own storage and are read (concatenated
  when several are used) on every call.
- Before every use :meth:`FusedLayout.matches` checks that W and b still *are* their views and
  each A is the tensor the layout was built for: same storage address, shape, strides, dtype and
  device, and the layer holds exactly
  the adapters the layout was built for. Anything else (``p.data = other``, ``model.to(...)``, an
  adapter added or deleted, ``copy.deepcopy``) fails the check, and :func:`ensure_layout` builds a
  new layout from the parameters' current values and re-points them into it. Only registered
  ``nn.Parameter`` objects are ever re-pointed; plain tensors (``torch.func.functional_call``)
  send the layer to the exact path instead.
- Scalings, stack weights and which adapters are used are never in the buffers: each forward
  takes only the used adapters' columns of ``x A^T``, so an unused adapter's values (even NaN)
  cannot reach the output.

It is handed the parameters (W, b and each adapter's A by name) and the B's, never the layer,
and imports nothing from ``layer``/``model``: the layer calls it. LoRA-only: it assumes the update
``s (x A^T) B^T``, so another adapter type computes its own forward.

Numerics: the sums are reordered (one GEMM over ``[W; A]``, an in-place ``addmm_``), so the result
agrees with the exact path (peft's op order) to float rounding, not bit for bit; the bound is
``peft_compat.FUSED_TOLERANCE``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .ledger import set_data

__all__ = ["FusedLayout", "ensure_layout", "detach_layout", "fused_supported", "fused_forward", "idle_rows_ok", "MAX_IDLE_ROWS"]

# An adapter that is loaded but not active still costs its rows of A in the one GEMM. Above this
# many idle rows (or a quarter of the layer's outputs, whichever is larger) the exact path, which
# computes only the active adapters, is cheaper.
MAX_IDLE_ROWS = 64
ROW_MULTIPLE = 8


def fused_supported(weight: torch.Tensor) -> bool:
    """The fused path is for dense fp32/fp64 weights; anything else takes the exact path."""
    return weight.dtype in (torch.float32, torch.float64) and weight.layout == torch.strided


def _signature(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)


@dataclass
class FusedLayout:
    """The buffers one layer's W, b and A's (the parameters, not the layer) are views of."""

    wa: torch.Tensor  # (out + R', in), R' >= R
    bias: torch.Tensor | None  # (out + R',)
    out: int
    names: tuple[str, ...]  # adapters, in row order
    rows: dict[str, slice]  # adapter -> its columns of x A^T, in [0, R)
    signatures: tuple  # what each parameter must look like for the layout to hold
    a_rows: tuple[torch.Tensor, ...] = ()  # each adapter's block of rows of wa, in ``names`` order (A is copied in)

    @property
    def rank(self) -> int:
        return sum(s.stop - s.start for s in self.rows.values())

    def matches(self, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``weight``, ``bias`` and every ``lora_A`` (adapter name -> A) are still exactly their views into these buffers."""
        return tuple(lora_A) == self.names and _signatures(weight, bias, lora_A) == self.signatures


def _signatures(weight: torch.Tensor, bias: torch.Tensor | None, lora_A: Mapping[str, torch.Tensor]) -> tuple:
    sigs = [_signature(weight), None if bias is None else _signature(bias)]
    sigs += [_signature(lora_A[name]) for name in lora_A]
    return tuple(sigs)


def ensure_layout(
    layout: FusedLayout | None, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: Mapping[str, torch.Tensor]
) -> FusedLayout | None:
    """``layout`` while ``weight``, ``bias`` and each ``lora_A`` (a layer's, adapter name -> A (r, in))
    still match it; else a new layout built from their current values (the parameters re-pointed
    into it); ``None`` when they are not all ``nn.Parameter`` objects (they cannot be re-pointed).
    The caller (the layer) keeps the layout returned."""
    if layout is not None and layout.matches(weight, bias, lora_A):
        for rows, A in zip(layout.a_rows, lora_A.values(), strict=True):
            rows.copy_(A.detach())  # the A's own their storage: their current values, copied in
        return layout
    params = [weight, *lora_A.values()] + ([] if bias is None else [bias])
    if not all(isinstance(p, nn.Parameter) for p in params):
        return None
    return _build(weight, bias, lora_A)


def _build(w: torch.Tensor, b: torch.Tensor | None, lora_A: Mapping[str, torch.Tensor]) -> FusedLayout:
    names = tuple(lora_A)
    ranks = [lora_A[n].shape[0] for n in names]
    out, rank = w.shape[0], sum(ranks)
    # Plain tensors even when the first forward runs under inference_mode: the parameters are
    # re-pointed into these buffers and must stay usable for training afterwards.
    with torch.inference_mode(False), torch.no_grad():
        total = -(-(out + rank) // ROW_MULTIPLE) * ROW_MULTIPLE
        wa = torch.zeros(total, w.shape[1], dtype=w.dtype, device=w.device)
        wa[:out].copy_(w)
        rows: dict[str, slice] = {}
        start = 0
        for name, r in zip(names, ranks, strict=True):
            rows[name] = slice(start, start + r)
            wa[out + start : out + start + r].copy_(lora_A[name])
            start += r
        bias = None
        if b is not None:
            bias = torch.zeros(total, dtype=w.dtype, device=w.device)
            bias[:out].copy_(b)
        # Re-point W and b into the buffers (same Parameter objects: optimizers keep them). The
        # content is copied exactly, so this is no edit: set_data leaves the edit count alone. The
        # A's are not re-pointed: a parameter the user sees owns its storage (a view would carry the
        # base weight into every torch.save of an A); their rows are refreshed on every call.
        set_data(w, wa[:out])
        if bias is not None:
            set_data(b, bias[:out])
        a_rows = tuple(wa[out + rows[name].start : out + rows[name].stop] for name in names)
    return FusedLayout(wa, bias, out, names, rows, _signatures(w, b, lora_A), a_rows)


def detach_layout(params: Iterable[torch.Tensor | None]) -> None:
    """Give every parameter (a layer's W, b and A's) its own compact storage again (on unload;
    the caller drops its layout)."""
    with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, also when unloaded inside inference_mode
        for p in params:
            if p is not None:
                set_data(p, p.detach().clone(memory_format=torch.contiguous_format))


def idle_rows_ok(layout: FusedLayout, used: Sequence[str], out_features: int) -> bool:
    """Whether the rows of loaded-but-unused adapters are few enough for the fused GEMM to pay."""
    busy = sum(layout.rows[n].stop - layout.rows[n].start for n in used)
    return layout.rank - busy <= max(MAX_IDLE_ROWS, out_features // 4)


def fused_forward(
    layout: FusedLayout, x: torch.Tensor, used: Sequence[str], lora_B: Sequence[torch.Tensor], scale: torch.Tensor
) -> torch.Tensor:
    """``x W^T + b + sum_i s_i (x A_i^T) B_i^T`` over the ``used`` adapters (their B's in ``lora_B``).

    ``scale`` (R_used,) holds each used column's s_i. One GEMM against ``[W; A_1; ...]`` gives the
    base output and the low-rank activations; one small GEMM adds ``(s x A^T) B^T`` in place.
    """
    out = layout.out
    shape = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    weight_t = layout.wa.t()  # (in, out + R')
    y = x2 @ weight_t if layout.bias is None else torch.addmm(layout.bias, x2, weight_t)  # (N, out + R')
    result = y[:, :out]  # (N, out) view, row stride out + R'
    if tuple(used) == layout.names:  # every adapter, in row order: one contiguous block of columns
        low = y[:, out : out + layout.rank]
    else:  # only the used adapters' columns, in their order: an unused adapter's values never enter
        low = torch.cat([y[:, out + layout.rows[n].start : out + layout.rows[n].stop] for n in used], dim=1)  # (N, R_used)
    b_cat = lora_B[0] if len(lora_B) == 1 else torch.cat(list(lora_B), dim=1)  # (out, R_used)
    low = low * scale  # (N, R_used)
    result.addmm_(low, b_cat.t())  # += (s x A^T) B^T, in place
    return result.reshape(*shape, out)

"""The merge ledger: merge a LoRA delta into a weight out of place, and unmerge bit-exactly.

The ledger takes the adapter type as an argument: each merged update is a :class:`MergeStep`, an
object that writes its merged weight deterministically (the same bits every time it is asked, so
unmerge can replay it). :class:`LoraDelta` is LoRA's (``W + s * B @ A`` with peft's float ops,
:func:`~mnist_peft.tuners.lora.layer.get_delta_weight`'s bits); DoRA's rescales each row
(:class:`mnist_peft.tuners.dora.layer.DoraDelta`). The record, the edit tracking and the replay
below do not look inside a step.

How unmerge stays exact. Merge is out of place and the original weight tensor is kept, so
``unmerge`` restores the base weight bit-exactly by putting that tensor back: no subtraction, no
drift, any number of cycles. If the merged weight was edited in place meanwhile, ``unmerge`` keeps
the edit (as peft does, by subtraction) instead of discarding it. Telling costs nothing when nothing
touched the weight: a base weight counts reads and writes of its ``.data`` (:class:`_TrackedParameter`)
and its version counter moves on every other in-place op; only when either moved is the merged
weight recomputed (bit for bit, from the :class:`MergeRecord`) and compared. Writes through raw
memory (numpy) are not seen.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

__all__ = [
    "LoraDelta",
    "MergeRecord",
    "MergeStep",
    "commit_merge",
    "delta_in_float32",
    "delta_weight_into",
    "merged_weight",
    "set_data",
    "track_data_access",
    "unmerged_weight",
    "untrack_data_access",
]


class MergeStep(Protocol):
    """One adapter's merged update as the ledger takes it (the adapter type's part of a merge)."""

    def merge_into(self, out: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """Write the merged weight; deterministic (unmerge replays it). The first step of a merge call gets
        ``delta`` None and writes ``merge(weight)`` into ``out`` (never into ``weight``); each later one gets
        ``out is weight`` (the weight so far) and a scratch ``delta`` buffer, and updates ``out`` in place."""
        ...

    def kept(self) -> MergeStep:
        """A copy that later edits of the adapter's parameters cannot change (what the record keeps)."""
        ...


@dataclass(frozen=True)
class LoraDelta:
    """LoRA's step: the delta ``(B @ A) * scaling`` added to the weight, with peft's bits."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float

    def merge_into(self, out: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        return _merge_step(out, weight, self.A, self.B, self.scaling, delta)

    def kept(self) -> LoraDelta:
        return LoraDelta(self.A.clone(), self.B.clone(), self.scaling)


def set_data(p: torch.Tensor, value: torch.Tensor) -> None:
    """``p.data = value``, as this package's own re-pointing (not counted as a user's edit)."""
    torch._C.TensorBase.data.__set__(p, value)


def delta_in_float32(t: torch.Tensor) -> bool:
    """Whether peft computes the delta of weights like ``t`` in float32 (half precision on CPU)."""
    return t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class _Merged:
    """One update merged into a weight, with what its bits depend on (so unmerge can recompute them)."""

    step: MergeStep
    first: bool
    """The first of its merge call: written from the weight into a fresh buffer; else applied to the
    weight so far, in place."""
    threads: int
    """torch's thread count then: a GEMM's rounding may depend on how its work is split."""


@dataclass
class MergeRecord:
    """What a merged layer keeps to restore its base weight (see :func:`commit_merge`)."""

    original: torch.Tensor  # the base weight unmerge puts back
    source: torch.Tensor  # the weight the logged merges were applied to
    log: list[_Merged] = field(default_factory=list)  # each merged delta, in order
    token: tuple | None = None  # the live weight's edit token right after the last merge


# ----------------------------------------------------------------------------- merge / unmerge
def merged_weight(weight: torch.Tensor, deltas: Sequence[MergeStep], scratch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``weight`` (detached) with each step merged in turn, in a tensor that is not the live one.

    Each step computes with peft's float ops (a LoRA delta is :func:`get_delta_weight`'s ops added
    to the weight), so a merged weight has the same bits as peft's. The live weight is never written. Scratch
    buffers (kept in ``scratch``, the layer's) are reused across merges (a fresh 8 MB tensor costs
    more in page faults than the merge itself); neither is ever the live weight.
    """
    out = _scratch(scratch, "merged", weight, avoid=weight)
    for i, step in enumerate(deltas):
        if i == 0:
            step.merge_into(out, weight, None)
        else:
            step.merge_into(out, out, _scratch(scratch, "delta", weight, avoid=weight))
    return out


def _scratch(cache: dict[str, torch.Tensor], key: str, like: torch.Tensor, *, avoid: torch.Tensor) -> torch.Tensor:
    """A reusable buffer like ``like`` -- reused only while nothing else holds its memory (a
    ``.data`` handle kept from an earlier merge must never alias a later live weight)."""
    buf = cache.get(key)
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
    cache[key] = buf
    return buf


def commit_merge(weight: nn.Parameter, record: MergeRecord | None, deltas: Sequence[MergeStep], new_weight: torch.Tensor) -> MergeRecord:
    """Make ``new_weight`` (from :func:`merged_weight` of ``deltas``) the live ``weight``; returns the
    record to keep (``record``, extended, or a new one), which keeps the original for unmerge.

    What unmerge needs to tell an edit made while merged is recorded, not copied: the weight
    the merges started from, each merged step (small: LoRA's ``(A, B, scaling)``) with how it was merged
    (torch's thread count is read here: call this right after ``merged_weight``, on the same
    thread, as :meth:`LoraModel.merge` does), and the live parameter's edit token
    (:func:`_edit_token`).
    """
    with torch.no_grad():
        if record is None or not _unedited(record, weight):
            # First merge, or merging more after an edit: restart the record from the live weight.
            original = weight.detach() if record is None else unmerged_weight(weight, record)
            record = MergeRecord(original=original, source=weight.detach())
        threads = torch.get_num_threads()
        record.log += [_Merged(step.kept(), i == 0, threads) for i, step in enumerate(deltas)]
        set_data(weight, new_weight)
    record.token = _edit_token(weight)
    return record


def _unedited(record: MergeRecord, weight: torch.Tensor) -> bool:
    """Whether the live weight is still, provably, what the merges wrote (no access since)."""
    return record.token is not None and record.token == _edit_token(weight)


def unmerged_weight(weight: torch.Tensor, record: MergeRecord | None) -> torch.Tensor:
    """The base weight without merged deltas: the kept original, plus any in-place edit made
    to the merged (live) ``weight`` since (``live - merged``, i.e. peft's ``live - delta``).

    When the live weight was touched (its version moved, or ``.data`` was read or set), the
    merged weight is recomputed from the record, bit for bit as merge made it, and compared.
    """
    live = weight.detach()
    if record is None:
        return live
    if _unedited(record, weight):
        return record.original
    merged = record.source
    for m in record.log:  # merged_weight's steps, on as many threads: the same bits
        with _num_threads(m.threads, merged.device):
            if m.first:
                merged = m.step.merge_into(torch.empty_like(merged, memory_format=torch.contiguous_format), merged, None)
            else:  # applied in place: never to the record's own weight
                merged = merged.clone() if merged is record.source else merged
                merged = m.step.merge_into(merged, merged, torch.empty_like(merged))
    if live.dtype == merged.dtype and live.device == merged.device and torch.equal(live, merged):
        return record.original
    original = record.original.to(dtype=live.dtype, device=live.device)
    edit = live - merged.to(dtype=live.dtype, device=live.device)
    return torch.where(edit == 0, original, original + edit)  # unedited entries keep their bits (-0.0 too)


# ----------------------------------------------------------------------------- one merge step, peft's bits
def _merge_step(
    out: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float, delta: torch.Tensor | None = None
) -> torch.Tensor:
    """One adapter merged, as a merge call does it (and unmerge replays it): the call's first adapter
    (``delta`` None) as ``weight + delta`` into ``out``; each later one's delta computed into ``delta``
    and added to ``out`` in place (``out`` then already holds the weight so far)."""
    if delta is None:
        return _weight_plus_delta_into(out, weight, A, B, s)
    return out.add_(delta_weight_into(delta, A, B, s))


def _weight_plus_delta_into(out: torch.Tensor, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """``weight + (B @ A) * s`` written into ``out`` (not ``weight``), with the bits of peft's merge:
    the delta rounded, then added. One ``addmm`` pass over the weight where this BLAS is seen to
    round exactly so for these shapes and strides (:func:`_addmm_is_two_step`); else a GEMM into
    ``out`` and an add, two passes."""
    if _is_power_of_two(s) and out.dtype in (torch.float32, torch.float64) and out.numel() >= _ADDMM_MIN_NUMEL:
        sB = B if s == 1.0 else B * s
        if _addmm_is_two_step(out, weight, sB, A):
            return torch.addmm(weight, sB, A, out=out)
    return delta_weight_into(out, A, B, s).add_(weight)  # fl(delta + W) == fl(W + delta)


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


def delta_weight_into(out: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """:func:`get_delta_weight` (``(B @ A) * s``, peft's bits) written into ``out``, (out, in)."""
    if delta_in_float32(out):  # as peft: in float32, the result cast
        return out.copy_(delta_weight_into(torch.empty(out.shape, dtype=torch.float32), A.float(), B.float(), s))
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


# ----------------------------------------------------------------------------- edit tracking (generic)
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
        set_data(self, value)

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


def track_data_access(p: torch.Tensor) -> None:
    """Count ``p``'s ``.data`` reads and writes from now on (a plain ``nn.Parameter`` only)."""
    if type(p) is nn.Parameter:
        p.__class__ = _TrackedParameter


def untrack_data_access(p: torch.Tensor) -> None:
    """Make ``p`` a plain ``nn.Parameter`` again (on unload)."""
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

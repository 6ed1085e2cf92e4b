"""How hard is a per-digit target on a given model? The logit-offset trade-off, computed exactly.

The cheapest way to cut a digit's errors is to make the model say that digit more readily: add a
constant ``b`` to its logit. Every test image then has a threshold ``m_i = max_{j != D} z_ij - z_iD``
above which it is predicted ``D``. Sorting those thresholds gives, for every possible ``b`` at once,
how many of the digit's errors are fixed and how many images of other digits turn into new errors.

:func:`logit_offset_tradeoff` reports, per digit, the best such offset that cuts the digit's wrong
count by a given fraction, and the overall errors it costs. It is chosen *on the test set itself*, so
it is an optimistic reference for the "say D more readily" trade, not a recipe: an adapter that
does better than it on some digit has learned to tell that digit apart better than the base does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from mnist_peft.errors import InvalidArgumentError
from mnist_peft.model.data import MnistSplit, load_mnist

__all__ = ["OffsetRow", "logit_offset_tradeoff"]


@dataclass
class OffsetRow:
    """The best constant offset on digit ``digit``'s logit that meets the cut, and what it costs."""

    digit: int
    wrong_before: int
    """The model's wrong count on this digit (offset 0)."""
    total_wrong_before: int
    """The model's wrong count over all digits (offset 0)."""
    allowed: int
    """Most wrong on this digit that meets the cut: ``floor((1 - cut) * wrong_before)``."""
    offset: float
    """The offset added to the digit's logit (one large enough always meets the cut)."""
    wrong_after: int
    total_wrong_after: int
    """Fewest overall errors of any offset that meets the cut."""
    both_met: bool
    """The cut is met and overall errors do not rise (accuracy not below the model's)."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@torch.no_grad()
def logit_offset_tradeoff(
    model: nn.Module, split: MnistSplit | None = None, *, cut: float = 0.4, data_dir: str | None = None
) -> list[OffsetRow]:
    """Per digit, the constant logit offset that cuts the digit's errors by ``cut`` at least cost.

    Exact: every offset that changes a prediction is considered (one per test image), no grid.

    Example:
        >>> rows = logit_offset_tradeoff(load_base("adapters/base/v1"))
        >>> [r.both_met for r in rows]
    """
    if not 0 < cut <= 1:
        raise InvalidArgumentError(f"cut must be in (0, 1], got {cut}")
    split = split if split is not None else load_mnist(train=False, data_dir=data_dir)
    was_training = model.training
    model.eval()
    logits = model(split.x).double()
    model.train(was_training)
    y = split.y
    wrong = logits.argmax(1) != y
    total_before = int(wrong.sum())
    rows = []
    for d in range(10):
        others = logits.clone()
        others[:, d] = -torch.inf
        best_other, other_pred = others.max(1)
        threshold = best_other - logits[:, d]  # predicted d iff offset > threshold (ties go to the lower index, as argmax)
        mine = y == d
        other_right = (~mine) & (other_pred == y)  # right as long as the image is not predicted d
        wrong_before = int((mine & wrong).sum())
        allowed = int((1 - cut) * wrong_before + 1e-9)
        # Sweep the offset upward through the sorted thresholds: after passing k of them, those k
        # images are predicted d. Errors = digit images not yet passed + other images passed or wrong anyway.
        order = torch.argsort(threshold)
        t, m, r = threshold[order], mine[order].long(), other_right[order].long()
        n_mine, n_right = int(m.sum()), int(r.sum())
        passed_mine = torch.cat([m.new_zeros(1), m.cumsum(0)])
        passed_right = torch.cat([r.new_zeros(1), r.cumsum(0)])
        wrong_d = n_mine - passed_mine
        total = wrong_d + (len(t) - n_mine - n_right) + passed_right
        # Only offsets that separate distinct thresholds are realisable. Passing all of them (the
        # last index) leaves no digit image wrong, so some offset always meets the cut.
        distinct = torch.ones(len(t) + 1, dtype=torch.bool)
        distinct[1:-1] = t[1:] > t[:-1]
        ok = distinct & (wrong_d <= allowed)
        cost = torch.where(ok, total, torch.iinfo(total.dtype).max)
        i = int(cost.argmin())
        # The offset: just above the last passed threshold (and below the next one).
        lo = float(t[i - 1]) if i > 0 else float(t[0]) - 1.0
        hi = float(t[i]) if i < len(t) else lo + 1.0
        offset = (lo + hi) / 2
        rows.append(
            OffsetRow(d, wrong_before, total_before, allowed, offset, int(wrong_d[i]), int(total[i]), int(total[i]) <= total_before)
        )
    return rows

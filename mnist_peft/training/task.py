"""One per-digit adapter recipe's data and objective (:class:`DigitTask`): batches that mix the digit
with replayed others, cross-entropy plus distillation toward the base on the replayed rows, the
recipe's augmentation and distortion of the images; both the solo and the batched trainer use it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.model.data import MnistSplit
from mnist_peft.tuners.lora.targets import lora_layers

from .augment import augment_batch, distort
from .loop import seed_loader_permutation

__all__ = ["DigitTask"]


class DigitTask:
    """An adapter recipe's data and objective for one digit: batches that mix the digit with
    replayed others, cross-entropy plus a distillation term toward the base (the teacher) on the
    replayed samples, optional augmentation; one generator draws every random choice in order."""

    def __init__(self, recipe: Any, digit: int, train: MnistSplit, teacher: nn.Module, generator: torch.Generator) -> None:
        self.recipe, self.digit, self.teacher, self.g = recipe, digit, teacher, generator
        self.mine = (train.y == digit).nonzero().squeeze(1)
        self.others = (train.y != digit).nonzero().squeeze(1)
        full = recipe.digit_fraction >= 1
        self.k = recipe.batch_size if full else max(1, round(recipe.batch_size * recipe.digit_fraction))

    def batches(self, epoch: int):
        recipe = self.recipe
        if recipe.digit_fraction >= 1:  # the seed's loader: shuffled digit-D images only
            yield from self.mine[seed_loader_permutation(len(self.mine))].split(recipe.batch_size)
            return
        while True:
            a = self.mine[torch.randint(len(self.mine), (self.k,), generator=self.g)]
            b = self.others[torch.randint(len(self.others), (recipe.batch_size - self.k,), generator=self.g)]
            yield torch.cat([a, b])

    def objective(self, m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        def teacher(rest: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return F.log_softmax(self.teacher(xb[rest]), 1)

        return self.objective_of(m(xb), yb, teacher)

    def objective_of(self, logits: torch.Tensor, yb: torch.Tensor, teacher: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The objective from the logits: cross-entropy, plus the distillation term on the replayed
        rows, whose targets ``teacher(rest_mask)`` gives (the batched trainer looks them up)."""
        loss = F.cross_entropy(logits, yb)
        if self.recipe.distill:
            rest = yb != self.digit
            if rest.any():
                kl = F.kl_div(F.log_softmax(logits[rest], 1), teacher(rest), log_target=True, reduction="batchmean")
                loss = loss + self.recipe.distill * kl
        return loss

    def loss(self, m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return self.objective(m, self.inputs(xb, yb), yb)

    def inputs(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """A batch as the recipe trains on it: every image augmented (``augment``), the digit's own
        images distorted (``distortion``), from the task's generator."""
        if self.recipe.augment:
            xb = augment_batch(xb, self.g)
        if self.recipe.distortion != "none":
            mine = yb == self.digit
            xb = xb.clone()
            r = self.recipe
            xb[mine] = distort(xb[mine], self.g, r.distortion, alpha=r.elastic_alpha, sigma=r.elastic_sigma)
        return xb

    def val_rows(self, y: torch.Tensor) -> torch.Tensor:
        """The validation rows scored: every image of the digit, then twice as many of the others."""
        mine = (y == self.digit).nonzero().squeeze(1)
        return torch.cat([mine, (y != self.digit).nonzero().squeeze(1)[: 2 * len(mine)]])

    def val_score(self, m: nn.Module, split: MnistSplit) -> float:
        # The held-out objective on a digit-balanced mix like the training batches: the base has
        # seen these images, so accuracy on them cannot move, but the adapter's objective can.
        idx = self.val_rows(split.y)
        with torch.no_grad(), _exact_forward(m):
            return -float(self.objective(m, split.x[idx], split.y[idx]))


@contextmanager
def _exact_forward(m: nn.Module):
    """Run ``m``'s LoRA layers in exact mode (peft's float ops) for a while: validation scores then
    come from the same ops as training, which lets the batched trainer reproduce them bit for bit."""
    states = {id(layer.state): layer.state for _, layer in lora_layers(m)}
    before = {k: st.forward_mode for k, st in states.items()}
    for st in states.values():
        st.forward_mode = "exact"
    try:
        yield
    finally:
        for k, st in states.items():
            st.forward_mode = before[k]

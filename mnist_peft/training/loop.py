"""The training loop on whole tensors (:func:`fit`, its knobs :class:`TrainConfig`) and evaluation.

What to train and how (base and adapter recipes) lives in :mod:`mnist_peft.training.recipes`.

Long runs get much faster with ``torch.set_flush_denormal(True)`` called at program start, before
PyTorch starts its worker threads (the ``mnist-peft`` command does this).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.errors import NonFiniteError, TrainConfigError
from mnist_peft.fileio import progress_enabled
from mnist_peft.model.data import MnistSplit, load_mnist
from mnist_peft.numerics import MAX_ABS_OUTPUT, check_seed, first_non_finite, require_bounded
from mnist_peft.progress import Progress

__all__ = [
    "MAX_BATCH_SIZE",
    "check_batch_size",
    "TrainConfig",
    "EvalResult",
    "FitResult",
    "fit",
    "make_optimizer",
    "evaluate",
    "predict",
    "EarlyStopping",
    "training_plan",
    "progress_enabled",
    "seed_loader_permutation",
]


MAX_BATCH_SIZE = 60_000
"""The largest batch: MNIST's training set. A larger one holds no more images, only (for the
replayed digits, drawn with replacement) copies, and is refused before any memory is allocated."""


def check_batch_size(batch_size: object) -> int:
    """``batch_size`` as an int in ``[1, MAX_BATCH_SIZE]``, else :class:`TrainConfigError` naming the range."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise TrainConfigError(
            f"batch_size (--batch-size) must be an integer from 1 to {MAX_BATCH_SIZE:,} (the training set's size), got {str(batch_size)[:40]}"
        )
    return batch_size


@dataclass
class TrainConfig:
    """How to train: the knobs of :func:`fit`. Recipes are named instances of this."""

    epochs: float = 4
    """Passes over the training data (a fraction trains on part of the last pass)."""
    batch_size: int = 128
    """Samples per optimiser step."""
    lr: float = 2e-3
    """Adam learning rate (the peak of the one-cycle schedule)."""
    seed: int = 0
    """Seeds model initialisation and data order; same seed, same machine, same weights."""
    schedule: str = "onecycle"
    """Learning-rate schedule: ``none`` (constant) or ``onecycle``."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay; 0 means plain Adam."""
    val_size: int = 0
    """Samples held out of the training set for early stopping; 0 disables early stopping."""
    patience: int = 2
    """Validation checks without improvement before training stops (with ``val_size`` > 0)."""
    eval_every: int = 0
    """Steps between validation checks; 0 means once per epoch."""
    max_steps: int = 0
    """Stop after this many optimiser steps; 0 means no limit beyond ``epochs``."""

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise TrainConfigError(f"epochs must be > 0, got {self.epochs}")
        check_batch_size(self.batch_size)
        check_seed(self.seed, name="seed (--seed)", error=TrainConfigError)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.schedule not in ("none", "onecycle"):
            raise TrainConfigError(f"schedule must be 'none' or 'onecycle', got {self.schedule!r}")
        if self.val_size < 0 or self.patience < 1 or self.max_steps < 0 or self.eval_every < 0:
            raise TrainConfigError("val_size, max_steps and eval_every must be >= 0 and patience >= 1")


@dataclass
class EvalResult:
    """Test metrics: accuracy, per-digit wrong counts and error rates, confusion matrix."""

    accuracy: float
    wrong_per_digit: list[int]
    error_rate_per_digit: list[float]
    n: int
    confusion: list[list[int]] = field(repr=False)
    """``confusion[true][pred]`` counts."""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class FitResult:
    steps: int
    epochs_run: float
    seconds: float
    final_loss: float
    best_val_accuracy: float | None = None
    """The best validation score seen (accuracy unless ``fit`` was given another ``val_score``)."""
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)


_LOGITS_FIX = (
    f"its answers are not usable numbers (limit +-{MAX_ABS_OUTPUT:g}); lower the stack weights (--weight) or use another "
    "adapter or base (one that diverged in training or was tampered with)"
)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 10_000) -> torch.Tensor:
    """Predicted labels (N,) in eval mode (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        labels = []
        for i in range(0, x.shape[0], batch_size):
            logits = model(x[i : i + batch_size])
            # A NaN logit's argmax is 0: a broken model would be scored (0.098), not refused.
            require_bounded({"logits": logits}, what="the model's outputs", fix=_LOGITS_FIX)
            labels.append(logits.argmax(1))
        return torch.cat(labels)
    finally:
        model.train(was_training)


def evaluate(model: nn.Module, split: MnistSplit | None = None, *, data_dir: str | None = None) -> EvalResult:
    """Accuracy, wrong count and error rate per digit, and the confusion matrix.

    Example:
        >>> r = evaluate(model)            # the MNIST test set
        >>> r.accuracy, r.wrong_per_digit  # (0.98..., [..10 ints..])
    """
    split = split if split is not None else load_mnist(train=False, data_dir=data_dir)
    pred = predict(model, split.x)
    conf = torch.bincount(split.y * 10 + pred, minlength=100).reshape(10, 10)
    totals = conf.sum(1)
    wrong = totals - conf.diag()
    n = int(totals.sum())
    return EvalResult(
        accuracy=float(conf.diag().sum()) / n,
        wrong_per_digit=[int(w) for w in wrong],
        error_rate_per_digit=[float(w) / float(t) if t else 0.0 for w, t in zip(wrong, totals, strict=True)],
        n=n,
        confusion=conf.tolist(),
    )


def seed_loader_permutation(n: int) -> torch.Tensor:
    """The order a ``DataLoader(shuffle=True)`` epoch draws from the global RNG (the seed's loader)."""
    torch.empty((), dtype=torch.int64).random_()  # the loader iterator's base seed
    seed = int(torch.empty((), dtype=torch.int64).random_().item())  # RandomSampler's seed
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _cross_entropy(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(xb), yb)


def fit(
    model: nn.Module,
    train: MnistSplit,
    config: TrainConfig,
    *,
    params: Iterable[nn.Parameter] | None = None,
    val: MnistSplit | None = None,
    loss_fn: LossFn = _cross_entropy,
    batches: Callable[[int], Iterable[torch.Tensor]] | None = None,
    val_score: Callable[[nn.Module, MnistSplit], float] | None = None,
    after_step: Callable[[], None] | None = None,
    progress: bool = False,
    desc: str = "train",
) -> FitResult:
    """Train ``params`` (default: all trainable parameters) of ``model`` on whole tensors.

    Data order per epoch is a permutation drawn exactly as ``DataLoader(shuffle=True)`` draws it
    from the global RNG, so a run seeded like the seed notebook sees the same batches. With ``val``,
    the best validation state is kept and training stops after ``patience`` checks without gain.

    Args:
        batches: optional ``epoch -> iterable of index tensors`` replacing the shuffled order (recipes mix digits).
        val_score: ``(model, val) -> score`` to maximise for early stopping (default: accuracy).
        after_step: called after every optimiser step (the null-space projection puts A back here).
    """
    params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    if not params:
        raise TrainConfigError("nothing to train: no parameter requires grad")
    opt, sched, steps_per_epoch, total = training_plan(params, config, len(train), after_step=after_step)
    stopper = EarlyStopping(val, val_score, every=config.eval_every or steps_per_epoch, patience=config.patience)
    model.train()
    step, epoch, loss, loss_value, start = 0, 0, None, float("nan"), time.perf_counter()
    bar = Progress(total, desc, enabled=progress, unit="step")
    while step < total and not stopper.stopped:
        for idx in batches(epoch) if batches is not None else _epoch_batches(len(train), config.batch_size):
            if step >= total:
                break
            loss = loss_fn(model, train.x[idx], train.y[idx])
            if not math.isfinite(loss_now := float(loss.detach())):  # a step on it would make every weight NaN
                raise _diverged(f"the loss became {loss_now} at step {step + 1}", config)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            step += 1
            if step % 50 == 0 or step == total:
                loss_value = loss_now
                bar.set_postfix(loss=f"{loss_value:.4f}")
            bar.update(1)
            try:
                if stopper.check(model, step, last=step == total):
                    break
            except NonFiniteError:  # the weights diverged on this step's update
                raise _diverged(f"the model's outputs became NaN or Inf at step {step}", config) from None
        epoch += 1
    bar.close()
    loss_value = float(loss.detach()) if loss is not None else loss_value
    if first_non_finite((str(i), p) for i, p in enumerate(params)) is not None:  # the last update is seen by no loss
        raise _diverged(f"the weights became NaN or Inf at step {step}", config)
    stopper.restore_best(model)
    model.eval()
    return FitResult(
        steps=step,
        epochs_run=step / steps_per_epoch,
        seconds=time.perf_counter() - start,
        final_loss=loss_value,
        best_val_accuracy=stopper.best,
        stopped_early=stopper.stopped,
        history=stopper.history,
    )


def _diverged(what: str, config: TrainConfig) -> TrainConfigError:
    """The one-line error of a run that diverged (nothing is saved: the caller never gets a model)."""
    return TrainConfigError(f"{what}: training diverged; lower --lr (now {config.lr:g}) or --lora-alpha, and train again")


class EarlyStopping:
    """Validation checks every ``every`` steps (and at the last): the best state is kept, and
    training stops after ``patience`` checks without gain. Without ``val`` it never checks."""

    def __init__(
        self, val: MnistSplit | None, score: Callable[[nn.Module, MnistSplit], float] | None, *, every: int, patience: int
    ) -> None:
        self.val, self.score, self.every, self.patience = val, score, every, patience
        self.best: float | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_checks, self.stopped = 0, False
        self.history: list[dict[str, float]] = []

    def due(self, step: int, *, last: bool) -> bool:
        """Whether a validation check falls on ``step``."""
        return self.val is not None and (step % self.every == 0 or last)

    def check(self, model: nn.Module, step: int, *, last: bool) -> bool:
        """Check if due; returns whether training should stop now."""
        if not self.due(step, last=last):
            return False
        value = self.score(model, self.val) if self.score is not None else evaluate(model, self.val).accuracy
        model.train()
        return self.record(step, value, lambda: copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()}))

    def record(self, step: int, value: float, state: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Take a validation score (``state()`` is kept when it is the best); returns whether to stop."""
        self.history.append({"step": step, "val_score": value})
        if self.best is None or value > self.best:
            self.best, self.bad_checks = value, 0
            self.best_state = state()
        else:
            self.bad_checks += 1
            self.stopped = self.bad_checks >= self.patience
        return self.stopped

    def restore_best(self, model: nn.Module, *, strict: bool = True) -> None:
        """Load the best state kept (``strict=False``: a state of some of the model's tensors)."""
        if self.best_state is not None:
            model.load_state_dict(self.best_state, strict=strict)


def training_plan(
    params: list[nn.Parameter], config: TrainConfig, n: int, *, after_step: Callable[[], None] | None = None
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None, int, int]:
    """``(optimiser, schedule or None, steps per epoch, total steps)`` for ``n`` training samples;
    ``after_step`` runs after each of the optimiser's steps."""
    opt = make_optimizer(params, config)
    if after_step is not None:
        opt.register_step_post_hook(lambda *_: after_step())
    steps_per_epoch = -(-n // config.batch_size)
    total = round(config.epochs * steps_per_epoch)
    if config.max_steps:
        total = min(total, config.max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=max(total, 1)) if config.schedule == "onecycle" else None
    return opt, sched, steps_per_epoch, total


def make_optimizer(params: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """Adam (AdamW with weight decay), fused: on CPU it is ~4x faster per step than the default."""
    if config.weight_decay:
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    return torch.optim.Adam(params, lr=config.lr, fused=True)


def _epoch_batches(n: int, batch_size: int) -> Iterable[torch.Tensor]:
    return seed_loader_permutation(n).split(batch_size)

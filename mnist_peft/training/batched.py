"""The batched trainer: K adapter jobs (digits, seeds, hyper-parameters; one base) trained in one loop.

Each step stacks every running job's batch into one tensor:

- the frozen base's work is done once for all of them: the first layer's base output and the
  teacher's log-probabilities (the distillation target) depend on the image only, so they are
  computed once per image of the training set for the whole fleet (when no job augments its
  images), and the base GEMMs of the deeper layers run on the stacked rows of all jobs;
- each job's adapter runs on its own rows, with its own type, scaling and rank: its layer's own
  exact forward (:meth:`LoraVariant.forward <mnist_peft.tuners.lora.layer.LoraVariant.forward>`) on
  the job's rows and their base output, so a DoRA job (``use_dora``) computes peft's DoRA ops
  (the magnitude vector, the row norm of ``W + s B A``) and trains its magnitude vector, as alone;
- each job keeps its own optimiser, one-cycle schedule, data order, validation split and
  early-stopping decision, and leaves the loop when it stops.

**Equality contract.** Every job runs the same float operations on the same values as
:func:`~mnist_peft.training.recipes.train_adapter` run alone with the same recipe and seed, as long as the
BLAS gives each row of a matrix product the same bits whatever the number of rows around it (true
of this machine's CPU kernels for 38 rows and more: the default recipe's batches;
``tests/test_fleet.py`` checks it for every product the stacked forward and backward compute).
Then each adapter equals its solo run bit for bit (the test asserts ``torch.equal``). Below that
(the seed recipe's 10-row batches) this machine's kernels round differently, and Adam's normalised
steps grow the rounding: after 60 steps the adapters differed by up to ~6e-7; no bound is claimed.

:class:`AdapterJob` (one adapter to train: a digit, a recipe with overrides, a name) is the job
spec that :mod:`mnist_peft.fleet` hands to its executors, too.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.errors import InvalidArgumentError
from mnist_peft.model.data import MnistSplit, load_mnist
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.tuners.lora.layer import LoraLinear
from mnist_peft.tuners.lora.model import LoraModel
from mnist_peft.tuners.lora.targets import lora_layers

from .loop import EarlyStopping, evaluate, training_plan
from .nullspace import null_space, null_space_report, preserved_spectra, project_
from .recipes import AdapterRecipe, AdapterTrainResult, resolve_recipe
from .task import DigitTask

__all__ = ["AdapterJob", "train_batched", "check_base"]


@dataclass(frozen=True)
class AdapterJob:
    """One adapter of a fleet: a digit, a recipe (by name) with overrides, and its name."""

    digit: int
    recipe: str = "replay"
    overrides: tuple[tuple[str, object], ...] = ()
    """Recipe fields to override, as ``(field, value)`` pairs (``seed``, ``r``, ``lr``, ...)."""
    name: str = ""
    """The registry name of the result (default ``digit-D``)."""

    def __post_init__(self) -> None:
        from mnist_peft.registry.names import validate_name

        if not (type(self.digit) is int and 0 <= self.digit <= 9):
            raise InvalidArgumentError(f"digit must be an int 0..9, got {self.digit!r}")
        if not self.name:
            object.__setattr__(self, "name", f"digit-{self.digit}")
        validate_name(self.name)  # it names a folder and a registry entry: no paths, no surprises

    def resolved(self) -> tuple[str, AdapterRecipe]:
        """``(recipe name, recipe with the overrides applied)``."""
        return resolve_recipe(self.recipe, dict(self.overrides))

    @property
    def seed(self) -> int:
        """The seed the job trains with (its override, else its recipe's)."""
        return int(dict(self.overrides).get("seed", self.resolved()[1].seed))


# ----------------------------------------------------------------------------- the batched trainer
@dataclass
class _Job:
    """One job's training state inside :func:`train_batched` (what ``fit`` keeps for one run)."""

    job: AdapterJob
    recipe_name: str
    recipe: AdapterRecipe
    model: LoraModel
    params: list[nn.Parameter]
    layers: list[LoraLinear | None]
    """Per base layer: the job's adapted layer (its adapter ``default``, of any type), or None."""
    train_index: torch.Tensor
    """Rows of the full training set that are this job's training split."""
    val_index: torch.Tensor | None
    task: DigitTask
    batches: Iterator[torch.Tensor]
    rng: torch.Tensor
    """The global RNG state the job's data order continues from (the seed recipe draws from it)."""
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None
    stopper: EarlyStopping
    total: int
    step: int = 0
    done: bool = False
    space: Any = None
    """With ``null_space_energy``: the job's :class:`~mnist_peft.training.nullspace.NullSpace`."""


def _job_batches(task: DigitTask) -> Iterator[torch.Tensor]:
    """The index batches ``fit`` draws from ``task.batches(epoch)``, epoch after epoch."""
    epoch = 0
    while True:
        yield from task.batches(epoch)
        epoch += 1


class _BaseOutputs:
    """The frozen base's share of the work: the first layer's output and the teacher's log-probs.

    With ``tables``, both are computed once per training image for the whole fleet (worth it when
    the fleet draws more rows than the training set holds); else per step, on the stacked rows of
    all jobs (one GEMM). Either way a row gets the bits the solo run computes for it.
    """

    def __init__(self, base: MnistMLP, x: torch.Tensor, *, tables: bool, teacher: bool, chunk: int = 8192) -> None:
        self.base, self.distill = base, teacher
        self.l1_table = self.lp_table = None
        if tables:
            l1, lp = [], []
            first, *deeper = (getattr(base, name) for name in base.LAYER_NAMES)
            with torch.no_grad():
                for i in range(0, x.shape[0], chunk):
                    h = first(x[i : i + chunk])
                    l1.append(h)
                    if teacher:  # MnistMLP.forward from its first layer's output on: the same ops
                        out = h
                        for layer in deeper:
                            out = layer(base.relu(out))
                        lp.append(F.log_softmax(out, 1))
            self.l1_table = torch.cat(l1)
            self.lp_table = torch.cat(lp) if teacher else None

    def l1(self, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The first layer's base output of training-set ``rows`` (None: the forward computes it)."""
        return self.l1_table[rows] if self.l1_table is not None and rows is not None else None

    def teacher(self, rows: torch.Tensor | None, x: torch.Tensor, need: torch.Tensor) -> torch.Tensor | None:
        """(N, 10) teacher log-probs, valid where ``need`` (the replayed rows of distilling jobs)."""
        if not self.distill:
            return None
        if self.lp_table is not None and rows is not None:
            return self.lp_table[rows]
        out = torch.zeros(x.shape[0], 10, dtype=x.dtype)
        if need.any():
            with torch.no_grad():
                out[need] = F.log_softmax(self.base(x[need]), 1)
        return out


def check_base(base: nn.Module) -> MnistMLP:
    """``base`` itself if it is a plain :class:`MnistMLP` (what batched training can train on).

    Raises:
        InvalidArgumentError: any other module, a subclass of ``MnistMLP`` included.
    """
    # The stacked forward re-traces MnistMLP.forward layer by layer: a subclass with a forward of its
    # own would silently train something else.
    if type(base) is not MnistMLP:
        raise InvalidArgumentError(f"batched training needs a plain MnistMLP base, got {type(base).__name__}; train it with train_adapter")
    return base


def _new_job(job: AdapterJob, base: MnistMLP, full: MnistSplit) -> _Job:
    """Set up one job exactly as ``train_adapter`` + ``fit`` do for a solo run (same RNG draws)."""
    name, recipe = job.resolved()
    torch.manual_seed(recipe.seed)
    model = LoraModel(copy.deepcopy(base), recipe.adapter_config())
    rng = torch.get_rng_state()
    params = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    held = {name.rsplit(".", 1)[-1]: layer for name, layer in lora_layers(model)}
    layers: list[LoraLinear | None] = []
    for lname in base.LAYER_NAMES:
        layer = held.get(lname)
        layers.append(layer if layer is not None and "default" in layer.lora_A else None)
    n = len(full)
    if recipe.val_size:
        if not 0 <= recipe.val_size < n:
            raise InvalidArgumentError(f"validation size must be in [0, {n}), got {recipe.val_size}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed))  # as split_validation draws it
        val_index, train_index = perm[: recipe.val_size], perm[recipe.val_size :]
    else:
        val_index, train_index = None, torch.arange(n)
    labels = MnistSplit(torch.empty(0, 784), full.y[train_index])  # the task draws indices from the labels only
    task = DigitTask(recipe, job.digit, labels, base, torch.Generator().manual_seed(recipe.seed))  # its teacher is unused here
    config = recipe.fit_config()
    opt, sched, steps_per_epoch, total = training_plan(params, config, len(train_index))
    val = MnistSplit(full.x[val_index], full.y[val_index]) if val_index is not None else None
    stopper = EarlyStopping(val, None, every=config.eval_every or steps_per_epoch, patience=config.patience)
    space = None
    if recipe.null_space_energy:  # as a solo run: A starts in the allowed directions and is put back after every step
        space = null_space(
            preserved_spectra(base, MnistSplit(full.x[train_index], full.y[train_index]), job.digit), recipe.null_space_energy
        )
        project_(model, space)
    found = _Job(
        job, name, recipe, model, params, layers, train_index, val_index, task, _job_batches(task), rng, opt, sched, stopper, total
    )
    found.space = space
    return found


def _stacked_forward(base: MnistMLP, jobs: list[_Job], x: torch.Tensor, l1_base: torch.Tensor | None, sizes: list[int]) -> torch.Tensor:
    """Logits of the stacked rows: job k's rows (``sizes[k]`` of them, in order) through the base plus
    job k's adapter, with the base's GEMMs on all rows at once. Per row, the same ops as
    ``LoraLinear``'s exact forward: the base output ``base_layer(x)``, then the adapter's type's
    exact forward on it (LoRA: ``+ lora_forward(x, A, B, s)``; DoRA: ``+ dora_term(...)``, which
    reads that base output too)."""
    h = x
    for i, lname in enumerate(base.LAYER_NAMES):
        layer: nn.Linear = getattr(base, lname)
        out = l1_base if (i == 0 and l1_base is not None) else layer(h)
        pieces = []
        for job, part, result in zip(jobs, h.split(sizes), out.split(sizes), strict=True):
            held = job.layers[i]
            pieces.append(held.variants["default"].forward(held, "default", part, result, True) if held is not None else result)
        out = torch.cat(pieces)
        h = torch.relu(out) if i < len(base.LAYER_NAMES) - 1 else out
    return h


def train_batched(
    base: nn.Module,
    jobs: Sequence[AdapterJob],
    *,
    data_dir: str | None = None,
    progress: Callable[[list[dict[str, object]]], None] | None = None,
    tables: bool | None = None,
) -> list[tuple[LoraModel, AdapterTrainResult]]:
    """Train every job's adapter on ``base`` together; each result as ``train_adapter`` returns it.

    Args:
        jobs: the adapters to train (a recipe with overrides each; any digits, seeds, ranks).
        progress: called after every step with one status dict per job (``name``, ``step``,
            ``total``, ``state``: ``running`` / ``stopped early`` / ``done``).
        tables: compute the base's first layer and the teacher once per training image (True) or
            per step (False); default: tables when the fleet draws more rows than the training set
            holds and no job augments its images. The results are the same either way.

    Returns:
        ``(model, result)`` per job, in order; ``result.seconds`` is the wall time of the whole
        batched run (the jobs share it).

    Example:
        >>> out = train_batched(load_base("adapters/base/v1"), [AdapterJob(d) for d in range(10)])
        >>> [r.after.wrong_per_digit[r.digit] for _, r in out]
    """
    base = check_base(base)
    if not jobs:
        raise InvalidArgumentError("no jobs to train")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"job names must be distinct, got {names}")
    for j in jobs:
        j.resolved()  # every recipe checked before any work
    start = time.perf_counter()
    # Each job's setup reseeds the global RNG (as a solo run does); the caller's state comes back
    # however the run ends, a job whose setup fails included.
    rng_outside = torch.get_rng_state()
    try:
        frozen = copy.deepcopy(base).requires_grad_(False).eval()  # the shared base GEMMs; the caller's base is never touched
        test = load_mnist(train=False, data_dir=data_dir)
        full = load_mnist(train=True, data_dir=data_dir)
        before = evaluate(frozen, test)
        states = [_new_job(j, frozen, full) for j in jobs]
        augmenting = any(_new_images(s.recipe) for s in states)
        drawn = sum(s.total * s.recipe.batch_size for s in states)
        if tables is None:
            tables = drawn >= len(full)
        shared = _BaseOutputs(frozen, full.x, tables=tables and not augmenting, teacher=any(s.recipe.distill for s in states))
        _run(frozen, states, full, shared, augmenting, progress)
    finally:
        torch.set_rng_state(rng_outside)
    seconds = time.perf_counter() - start
    results = []
    for s in states:
        s.model.eval()
        after = evaluate(s.model, test)
        results.append(
            (
                s.model,
                AdapterTrainResult(
                    digit=s.job.digit,
                    recipe=s.recipe_name,
                    steps=s.step,
                    seconds=seconds,
                    stopped_early=s.stopper.stopped,
                    before=before,
                    after=after,
                    null_space=None if s.space is None else null_space_report(s.model, frozen, test, s.job.digit, s.space),
                ),
            )
        )
    return results


def _new_images(recipe: AdapterRecipe) -> bool:
    """Whether a recipe trains on images the base has not seen (augmented or distorted ones)."""
    return recipe.augment or recipe.distortion != "none"


def _status(states: list[_Job]) -> list[dict[str, object]]:
    return [
        {
            "name": s.job.name,
            "step": s.step,
            "total": s.total,
            "state": ("stopped early" if s.stopper.stopped else "done") if s.done else "running",
        }
        for s in states
    ]


def _run(base: MnistMLP, states: list[_Job], full: MnistSplit, shared: _BaseOutputs, augmenting: bool, progress) -> None:
    for s in states:
        s.model.train()
    while True:
        running = [s for s in states if not s.done]
        if not running:
            return
        index, xs = [], []
        for s in running:
            torch.set_rng_state(s.rng)
            idx = s.train_index[next(s.batches)]
            s.rng = torch.get_rng_state()
            index.append(idx)
            if augmenting:
                xb = full.x[idx]
                xs.append(s.task.inputs(xb, full.y[idx]) if _new_images(s.recipe) else xb)
        sizes = [len(i) for i in index]
        rows = torch.cat(index)
        y = full.y[rows]
        x = torch.cat(xs) if augmenting else full.x[rows]  # augmented images are new: the base sees them here
        known = None if augmenting else rows
        l1_base = shared.l1(known)
        teacher = shared.teacher(known, x, _replayed(running, y, sizes))
        logits = _stacked_forward(base, running, x, l1_base, sizes)
        losses = []
        offset = 0
        for s, lg, yb, n in zip(running, logits.split(sizes), y.split(sizes), sizes, strict=True):
            t = teacher[offset : offset + n] if teacher is not None else None
            losses.append(s.task.objective_of(lg, yb, lambda rest, t=t: t[rest]))
            offset += n
        for s in running:
            s.opt.zero_grad(set_to_none=True)
        torch.autograd.backward(losses)
        for s in running:
            s.opt.step()
            if s.space is not None:
                project_(s.model, s.space)
            if s.sched is not None:
                s.sched.step()
            s.step += 1
        due = [s for s in running if s.stopper.due(s.step, last=s.step == s.total)]
        scores = _val_scores(base, due, full, shared) if due else {}
        for s in running:
            stop = id(s) in scores and s.stopper.record(s.step, scores[id(s)], lambda s=s: _adapter_state(s.model))
            if stop or s.step >= s.total:
                s.done = True
                s.stopper.restore_best(s.model, strict=False)
                s.model.eval()
        if progress is not None:
            progress(_status(states))


def _replayed(jobs: list[_Job], y: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Rows the teacher is needed for: each distilling job's rows of other digits than its own."""
    digit = torch.cat([torch.full((n,), s.job.digit if s.recipe.distill else -1) for s, n in zip(jobs, sizes, strict=True)])
    distill = torch.cat([torch.full((n,), bool(s.recipe.distill)) for s, n in zip(jobs, sizes, strict=True)])
    return distill & (y != digit)


def _adapter_state(model: LoraModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors, copied: the best state early stopping keeps (the base is frozen)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _val_scores(base: MnistMLP, due: list[_Job], full: MnistSplit, shared: _BaseOutputs) -> dict[int, float]:
    """``DigitTask.val_score`` for each due job, in one stacked forward."""
    index = []
    for s in due:
        index.append(s.val_index[s.task.val_rows(full.y[s.val_index])])
    sizes = [len(i) for i in index]
    rows = torch.cat(index)
    with torch.no_grad():
        x, y = full.x[rows], full.y[rows]
        logits = _stacked_forward(base, due, x, shared.l1(rows), sizes)
        teacher = shared.teacher(rows, x, _replayed(due, y, sizes))
        out, offset = {}, 0
        for s, lg, yb, n in zip(due, logits.split(sizes), y.split(sizes), sizes, strict=True):
            t = teacher[offset : offset + n] if teacher is not None else None
            out[id(s)] = -float(s.task.objective_of(lg, yb, lambda rest, t=t: t[rest]))
            offset += n
    return out

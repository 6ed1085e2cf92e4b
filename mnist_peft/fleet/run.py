"""Fleets of adapters: many trained together on one machine, or spread over a Ray cluster.

**Batched training** (:func:`train_batched`). K adapter jobs (digits, seeds, hyper-parameters;
one base) train in one loop. Each step stacks every running job's batch into one tensor:

- the frozen base's work is done once for all of them: the first layer's base output and the
  teacher's log-probabilities (the distillation target) depend on the image only, so they are
  computed once per image of the training set for the whole fleet (when no job augments its
  images), and the base GEMMs of the deeper layers run on the stacked rows of all jobs;
- each job's low-rank branch runs on its own rows, with its own scaling and rank;
- each job keeps its own optimiser, one-cycle schedule, data order, validation split and
  early-stopping decision, and leaves the loop when it stops.

**Equality contract.** Every job runs the same float operations on the same values as
:func:`~mnist_peft.training.recipes.train_adapter` run alone with the same recipe and seed, as long as the
BLAS gives each row of a matrix product the same bits whatever the number of rows around it (true
of this machine's CPU kernels for 38 rows and more: the default recipe's batches; the test checks
it). Then each adapter equals its solo run bit for bit; where a BLAS breaks that, the
difference is float rounding (the test bounds it and requires the same per-digit wrong counts).

**Executors** (:func:`run_fleet`). ``local`` runs :func:`train_batched` in this process; ``ray``
runs each job as a Ray task (``max_retries`` for killed workers) that loads the base's own folder
(by absolute path) or its Hub repo and returns the adapter's tensors and metadata; the driver
checks them, computes the metrics and writes the folder itself. Either way the driver registers
the whole fleet in one registry write (:meth:`AdapterRegistry.add_many`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.errors import (
    AdapterConfigError,
    FleetError,
    HubError,
    InvalidArgumentError,
    MnistPeftError,
    NonFiniteError,
    TrainConfigError,
)
from mnist_peft.model.data import MnistSplit, load_mnist
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.training.loop import _EarlyStopping, evaluate, training_plan
from mnist_peft.training.recipes import AdapterRecipe, AdapterTrainResult, _DigitTask, _resolve_recipe, augment_batch, save_trained_adapter
from mnist_peft.tuners.lora.layer import LoraConfig, LoraModel, lora_forward, lora_layers

__all__ = ["AdapterJob", "train_batched", "parse_digits", "fleet_jobs", "run_fleet", "FleetResult", "FleetAdapter", "EXECUTORS"]

_LAYERS = ("linear1", "linear2", "linear3")


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
        from mnist_peft.registry.adapter_registry import validate_name

        if not (type(self.digit) is int and 0 <= self.digit <= 9):
            raise InvalidArgumentError(f"digit must be an int 0..9, got {self.digit!r}")
        if not self.name:
            object.__setattr__(self, "name", f"digit-{self.digit}")
        validate_name(self.name)  # it names a folder and a registry entry: no paths, no surprises

    def resolved(self) -> tuple[str, AdapterRecipe]:
        """``(recipe name, recipe with the overrides applied)``."""
        return _resolve_recipe(self.recipe, dict(self.overrides))

    @property
    def seed(self) -> int:
        return int(dict(self.overrides).get("seed", self.resolved()[1].seed))


def parse_digits(text: str) -> list[int]:
    """``"0-9"``, ``"3"``, ``"1,4,7"`` or ``"0-2,9"`` -> a sorted list of distinct digits.

    Raises:
        InvalidArgumentError: anything else, or a digit outside 0..9.
    """
    import re

    digits: set[int] = set()
    for part in str(text).split(","):
        found = re.fullmatch(r"\s*([0-9])\s*(?:-\s*([0-9])\s*)?", part)
        if found is None:
            raise InvalidArgumentError(f"digits {text!r}: expected e.g. '0-9', '3' or '1,4,7'")
        a = int(found[1])
        b = int(found[2]) if found[2] is not None else a
        if not (0 <= a <= b <= 9):
            raise InvalidArgumentError(f"digits {text!r}: each digit must be 0..9 and ranges must go up (e.g. '2-5')")
        digits.update(range(a, b + 1))
    return sorted(digits)


# ----------------------------------------------------------------------------- the batched trainer
@dataclass
class _Job:
    """One job's training state inside :func:`train_batched` (what ``fit`` keeps for one run)."""

    job: AdapterJob
    recipe_name: str
    recipe: AdapterRecipe
    model: LoraModel
    params: list[nn.Parameter]
    layers: list[tuple[torch.Tensor, torch.Tensor, float] | None]
    """Per base layer: ``(A, B, scaling)`` of the adapter (the live parameters), or None."""
    train_index: torch.Tensor
    """Rows of the full training set that are this job's training split."""
    val_index: torch.Tensor | None
    task: _DigitTask
    batches: Iterator[torch.Tensor]
    rng: torch.Tensor
    """The global RNG state the job's data order continues from (the seed recipe draws from it)."""
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler | None
    stopper: _EarlyStopping
    total: int
    step: int = 0
    done: bool = False


def _job_batches(task: _DigitTask) -> Iterator[torch.Tensor]:
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
            with torch.no_grad():
                for i in range(0, x.shape[0], chunk):
                    h = base.linear1(x[i : i + chunk])
                    l1.append(h)
                    if teacher:  # MnistMLP.forward from its first layer's output on: the same ops
                        lp.append(F.log_softmax(base.linear3(base.relu(base.linear2(base.relu(h)))), 1))
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


def _check_base(base: nn.Module) -> MnistMLP:
    # The stacked forward re-traces MnistMLP.forward layer by layer: a subclass with a forward of its
    # own would silently train something else.
    if type(base) is not MnistMLP:
        raise InvalidArgumentError(f"batched training needs a plain MnistMLP base, got {type(base).__name__}; train it with train_adapter")
    return base


def _new_job(job: AdapterJob, base: MnistMLP, full: MnistSplit) -> _Job:
    """Set up one job exactly as ``train_adapter`` + ``fit`` do for a solo run (same RNG draws)."""
    name, recipe = job.resolved()
    torch.manual_seed(recipe.seed)
    model = LoraModel(copy.deepcopy(base), LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, init_lora_weights=recipe.init_lora_weights))
    rng = torch.get_rng_state()
    params = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    held = {name.rsplit(".", 1)[-1]: layer for name, layer in lora_layers(model)}
    layers = []
    for lname in _LAYERS:
        layer = held.get(lname)
        if layer is not None and "default" in layer.lora_A:
            layers.append((layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"]))
        else:
            layers.append(None)
    n = len(full)
    if recipe.val_size:
        if not 0 <= recipe.val_size < n:
            raise InvalidArgumentError(f"validation size must be in [0, {n}), got {recipe.val_size}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed))  # as split_validation draws it
        val_index, train_index = perm[: recipe.val_size], perm[recipe.val_size :]
    else:
        val_index, train_index = None, torch.arange(n)
    labels = MnistSplit(torch.empty(0, 784), full.y[train_index])  # the task draws indices from the labels only
    task = _DigitTask(recipe, job.digit, labels, base, torch.Generator().manual_seed(recipe.seed))  # its teacher is unused here
    config = recipe.fit_config()
    opt, sched, steps_per_epoch, total = training_plan(params, config, len(train_index))
    val = MnistSplit(full.x[val_index], full.y[val_index]) if val_index is not None else None
    stopper = _EarlyStopping(val, None, every=config.eval_every or steps_per_epoch, patience=config.patience)
    return _Job(job, name, recipe, model, params, layers, train_index, val_index, task, _job_batches(task), rng, opt, sched, stopper, total)


def _stacked_forward(base: MnistMLP, jobs: list[_Job], x: torch.Tensor, l1_base: torch.Tensor | None, sizes: list[int]) -> torch.Tensor:
    """Logits of the stacked rows: job k's rows (``sizes[k]`` of them, in order) through the base plus
    job k's adapter, with the base's GEMMs on all rows at once. Per row, the same ops as
    ``LoraLinear``'s exact forward: ``base_layer(x) + lora_forward(x, A, B, s)``."""
    h = x
    for i, lname in enumerate(_LAYERS):
        layer: nn.Linear = getattr(base, lname)
        out = l1_base if (i == 0 and l1_base is not None) else layer(h)
        parts = h.split(sizes)
        deltas = []
        for job, part in zip(jobs, parts, strict=True):
            A, B, s = job.layers[i] if job.layers[i] is not None else (None, None, 0.0)
            deltas.append(lora_forward(part, A, B, s) if A is not None else torch.zeros(part.shape[0], layer.out_features))
        out = out + torch.cat(deltas)
        h = torch.relu(out) if i < len(_LAYERS) - 1 else out
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
    base = _check_base(base)
    if not jobs:
        raise InvalidArgumentError("no jobs to train")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"job names must be distinct, got {names}")
    for j in jobs:
        j.resolved()  # every recipe checked before any work
    start = time.perf_counter()
    rng_outside = torch.get_rng_state()
    frozen = copy.deepcopy(base).requires_grad_(False).eval()  # the shared base GEMMs; the caller's base is never touched
    test = load_mnist(train=False, data_dir=data_dir)
    full = load_mnist(train=True, data_dir=data_dir)
    before = evaluate(frozen, test)
    states = [_new_job(j, frozen, full) for j in jobs]
    augmenting = any(s.recipe.augment for s in states)
    drawn = sum(s.total * s.recipe.batch_size for s in states)
    if tables is None:
        tables = drawn >= len(full)
    shared = _BaseOutputs(frozen, full.x, tables=tables and not augmenting, teacher=any(s.recipe.distill for s in states))
    try:
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
                ),
            )
        )
    return results


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
                xs.append(augment_batch(xb, s.task.g) if s.recipe.augment else xb)
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
    """``_DigitTask.val_score`` for each due job, in one stacked forward."""
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


# ----------------------------------------------------------------------------- a fleet, end to end
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
"""The files a fleet job hands back (a PEFT adapter folder); nothing else is accepted from a worker."""

EXECUTORS = ("local", "ray")


@dataclass
class FleetAdapter:
    """One trained adapter of a fleet, saved in a folder of the driver's."""

    name: str
    digit: int
    seed: int
    steps: int
    folder: str | None
    """Where it is: a folder under ``out``, None when the fleet was only registered."""
    metrics: dict[str, object]


@dataclass
class FleetResult:
    """What :func:`run_fleet` did: the adapters trained, the jobs that failed, what was registered."""

    executor: str
    trained: list[FleetAdapter]
    failed: dict[str, str]
    registered: list[dict[str, object]] = field(default_factory=list)
    pushed: dict[str, object] | None = None
    seconds: float = 0.0
    base_revision: str | None = None
    """The Hub commit of a Hub base that the driver and every Ray worker read (None otherwise)."""


def fleet_jobs(digits: Sequence[int], seeds: Sequence[int] = (0,), *, prefix: str = "digit", **overrides: object) -> list[AdapterJob]:
    """One job per (digit, seed): named ``PREFIX-D``, or ``PREFIX-D-sS`` when there are several seeds.

    ``overrides`` are recipe fields (``recipe`` picks the recipe by name; ``None`` values are ignored).
    """
    recipe = str(overrides.pop("recipe", None) or "replay")
    extra = {k: v for k, v in overrides.items() if v is not None}
    seeds = list(dict.fromkeys(seeds)) or [0]
    bad = [s for s in seeds if type(s) is not int or not 0 <= s < 2**63]
    if bad:
        raise InvalidArgumentError(f"seeds must be integers from 0 to 2**63 - 1, got {bad}")
    sep = "" if prefix.endswith(("-", "_", ".")) else "-"
    return [
        AdapterJob(d, recipe, tuple(sorted({**extra, "seed": seed}.items())), f"{prefix}{sep}{d}" + (f"-s{seed}" if len(seeds) > 1 else ""))
        for d in digits
        for seed in seeds
    ]


def _save(model: LoraModel, result: AdapterTrainResult, job: AdapterJob, base_ref: str, folder: str) -> FleetAdapter:
    """Write one trained adapter as ``train-adapter`` writes it (metadata, model card), with its seed."""
    save_trained_adapter(model, result, folder, base_model=base_ref, extra={"seed": str(job.seed)})
    return FleetAdapter(job.name, job.digit, job.seed, result.steps, str(folder), result.metrics())


_FINAL_ERRORS = (TrainConfigError, AdapterConfigError, InvalidArgumentError, NonFiniteError)
"""Worker errors that come from the job's own input, so a retry would only repeat them."""


def _train_one(
    job: AdapterJob, base_ref: str, source: str, data_dir: str | None, fault: tuple[str, ...] | None, revision: str | None = None
) -> dict:
    """A Ray task: load the base ``source`` (an absolute folder, or a Hub repo id at commit
    ``revision``, the one the driver checked), train one job alone, and return its adapter files
    (``base_ref`` is what the adapter's config and card name as its base, as the local executor
    writes them). The driver checks them and computes the metrics.

    An error of the job's own input (a recipe or adapter config error) comes back as
    ``{"error": ...}``: it would fail the same way again, so it is not retried. Anything else (a
    Hub or network error, a file missing on this node, a dead process) raises, and Ray retries.

    ``fault`` is a test hook: ``("kill-once", NAME, DIR)`` ends the worker process the first time job
    NAME has trained, before it returns (a marker in DIR remembers it); ``("fail", NAME)`` makes job
    NAME raise every time; ``("bad-input", NAME, DIR)`` gives it an input error (each attempt is
    logged in DIR).
    """
    import os
    import tempfile
    from pathlib import Path

    from mnist_peft.model.mlp import load_base
    from mnist_peft.training.recipes import train_adapter

    if fault and fault[0] == "fail" and fault[1] == job.name:
        raise RuntimeError(f"injected failure of job {job.name}")
    torch.set_flush_denormal(True)  # as the driver does: the same floats on both executors
    try:
        if fault and fault[0] == "bad-input" and fault[1] == job.name:
            with open(Path(fault[2]) / f"attempts-{job.name}", "a") as log:
                log.write("attempt\n")
            raise TrainConfigError(f"injected input error of job {job.name}")
        base = load_base(source, revision=revision)
        model, result = train_adapter(base, job.digit, job.recipe, data_dir=data_dir, **dict(job.overrides))
    except _FINAL_ERRORS as exc:  # the job's own input: the same on any machine, every time
        return {"name": job.name, "error": f"{type(exc).__name__}: {exc}"}
    if fault and fault[0] == "kill-once" and fault[1] == job.name:
        marker = Path(fault[2]) / f"killed-{job.name}"
        if not marker.exists():
            marker.touch()
            os._exit(1)  # the worker dies with its work done but not returned, as a preempted machine's would
    with tempfile.TemporaryDirectory(prefix="mnist-peft-fleet-") as tmp:
        _save(model, result, job, base_ref, tmp)
        return {"name": job.name, "files": {f: (Path(tmp) / f).read_bytes() for f in ADAPTER_FILES}, "base_revision": revision}


class _Progress:
    """One progress bar for the fleet with per-job status on a terminal; otherwise a line on stderr
    now and then (every ``every`` seconds, and when a job ends)."""

    def __init__(self, jobs: Sequence[AdapterJob], *, unit_total: int, unit: str, tty: bool, quiet: bool, every: float = 15.0) -> None:
        import sys

        from tqdm.auto import tqdm

        self.names = [j.name for j in jobs]
        self.quiet, self.tty, self.every = quiet, tty, every
        self.bar = tqdm(total=unit_total, desc="fleet", unit=unit, leave=False, disable=quiet or not tty)
        self.last_line, self.ended = time.monotonic(), set()
        self.stream = sys.stderr
        self.done = 0

    def update(self, status: list[dict[str, object]], done_units: int) -> None:
        if self.quiet:
            return
        self.bar.update(done_units - self.done)
        self.done = done_units
        ended = {str(s["name"]) for s in status if s["state"] not in ("running", "pending")}
        if self.tty:
            self.bar.set_postfix_str(" ".join(f"{s['name']}:{_short(s)}" for s in status), refresh=False)
            return
        if ended - self.ended or time.monotonic() - self.last_line >= self.every:
            self.last_line = time.monotonic()
            print(
                f"fleet: {len(ended)}/{len(status)} jobs ended; " + ", ".join(f"{s['name']} {_short(s)}" for s in status), file=self.stream
            )
        self.ended = ended

    def close(self) -> None:
        self.bar.close()


def _short(s: dict[str, object]) -> str:
    state = str(s["state"])
    if state == "running" and "total" in s:
        return f"{s['step']}/{s['total']}"
    return state


def run_fleet(
    base_ref: str,
    jobs: Sequence[AdapterJob],
    *,
    root: str | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    retries: int = 2,
    out: str | None = None,
    register: bool = False,
    allow_partial: bool = False,
    push_repo: str | None = None,
    token: str | None = None,
    data_dir: str | None = None,
    quiet: bool = False,
    tty: bool | None = None,
    _fault: tuple[str, ...] | None = None,
) -> FleetResult:
    """Train ``jobs`` on the base ``base_ref`` and keep the results: folders under ``out``, one
    registry batch (``register``), one Hub commit (``push_repo``, with ``register``).

    Every recipe is checked before any work starts; fleets run with denormals flushed (as the
    ``mnist-peft`` command and the Ray workers do), so both executors compute the same floats. A
    Python caller should call ``torch.set_flush_denormal(True)`` before any torch work: the flag set
    here does not reach threads torch has already started.
    Adapters that come back from Ray workers are read as untrusted files: the folder must load onto
    the driver's base (keys, shapes, finite values, its fingerprint), hold the job's digit, rank and
    alpha, and its metrics are computed here, on the driver's test set.

    Args:
        executor: ``local`` (all jobs in one batched loop here) or ``ray`` (one Ray task per job,
            on the cluster at ``ray_address``, else ``$RAY_ADDRESS``, else a new local Ray).
        retries: how many times Ray re-runs a job whose worker died or which raised unexpectedly.
        allow_partial: with failed jobs, keep (and register) the others instead of failing all.

    Raises:
        FleetError: a job failed for good and ``allow_partial`` is off, or no job succeeded;
            nothing was registered or written.
        HubError: the push failed; the fleet is registered, and the message says how to push it.
    """
    import os
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    from mnist_peft.model.data import resolve_data_root
    from mnist_peft.model.mlp import base_fingerprint, looks_like_path
    from mnist_peft.registry.adapter_registry import AdapterRegistry
    from mnist_peft.registry.refs import registry_folder, resolve_base

    if executor not in EXECUTORS:
        raise InvalidArgumentError(f"unknown executor {executor!r}; choose from {', '.join(EXECUTORS)}")
    if not jobs:
        raise InvalidArgumentError("no jobs: give at least one digit")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"job names must be distinct, got {names}")
    if push_repo and not register:
        raise InvalidArgumentError("pushing a fleet needs it registered first: add --register")
    if not out and not register:
        raise InvalidArgumentError("give an output folder, ask to register the fleet, or both")
    if out and Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise InvalidArgumentError(f"output folder {out!r} exists and is not an empty folder; pick a new one")
    if retries < 0:
        raise InvalidArgumentError(f"retries must be >= 0, got {retries}")
    for j in jobs:
        _check_job(j)  # a bad recipe value is refused here, not in every worker
    torch.set_flush_denormal(True)  # before any torch work starts its threads: they keep what they start with
    registry = AdapterRegistry(root)
    revision = None
    if executor == "ray" and "/" in base_ref and not Path(base_ref).exists() and not looks_like_path(base_ref):
        # A Hub repo id (registry names hold no '/'): the driver and every worker read one commit.
        # Offline, or with the Hub out of reach, each process reads its own cache instead, as
        # before; a worker whose base differs is refused by the fingerprint check.
        from huggingface_hub import constants

        from mnist_peft.hub.transfer import head_commit

        if not constants.HF_HUB_OFFLINE:
            try:
                revision = head_commit(base_ref)
            except HubError:
                revision = None  # loading the base below reports what is wrong, or uses the cache
    base = _check_base(resolve_base(base_ref, registry, revision=revision))  # the driver checks the base before any job starts
    fingerprint = base_fingerprint(base)
    tty = (sys.stderr.isatty() and sys.stdout.isatty()) if tty is None else tty
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mnist-peft-fleet-") as tmp:
        if executor == "local":
            trained, failed = _run_local(base, base_ref, jobs, tmp, data_dir=data_dir, quiet=quiet, tty=tty)
        else:
            # Workers read the base's own files (never the registry's index), by absolute path, or from the Hub.
            folder = Path(base_ref) if Path(base_ref).exists() else registry_folder(base_ref, registry, "base")
            source = os.path.abspath(folder) if folder is not None else base_ref
            returned, failed = _run_ray(
                base_ref, source, jobs, tmp, data_dir=data_dir and str(resolve_data_root(data_dir).absolute()),
                address=ray_address, retries=retries, quiet=quiet, tty=tty, fault=_fault, revision=revision,
            )  # fmt: skip
            trained = _accept(returned, jobs, base, base_ref, fingerprint, failed, data_dir=data_dir, tmp=tmp)
        order = {n: i for i, n in enumerate(names)}
        failed = dict(sorted(failed.items(), key=lambda kv: order[kv[0]]))
        if failed and (not allow_partial or not trained):
            what = "no job of the fleet succeeded" if not trained else f"{len(failed)} of {len(jobs)} fleet jobs failed"
            raise FleetError(
                f"{what}: " + "; ".join(f"{n}: {e[:300]}" for n, e in failed.items())
                + ". Nothing was registered or written; fix the cause and rerun"
                + ("" if not trained else ", or pass --allow-partial to keep the others"),
                failed=failed,
            )  # fmt: skip
        result = FleetResult(executor, trained, failed, base_revision=revision)
        placed = None
        if out:  # built next to ``out`` and renamed into place before registering: a failure leaves neither
            dest = Path(out)
            existed = dest.is_dir()
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
            try:
                for a in trained:
                    shutil.copytree(a.folder, staging / a.name)
                os.replace(staging, dest)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            placed = (dest, existed)
        try:
            if register:
                added = registry.add_many([(a.name, a.folder, {"metrics": a.metrics, "digit": a.digit}) for a in trained])
                result.registered = [{"name": e.name, "version": e.version} for e in added]
        except BaseException:
            if placed is not None:  # ours: made just now (an existing ``out`` was checked empty)
                shutil.rmtree(placed[0], ignore_errors=True)
                if placed[1]:
                    placed[0].mkdir()
            raise
        for a in trained:
            a.folder = str(Path(out) / a.name) if out else None
    if push_repo and result.registered:
        import shlex

        from mnist_peft.hub.transfer import push_to_hub

        refs = [f"{e['name']}@{e['version']}" for e in result.registered]
        try:
            pushed = push_to_hub(push_repo, registry=registry, names=refs, token=token)  # these versions, not a later one
        except MnistPeftError as exc:
            names_args = " ".join(f"--name {r}" for r in refs)
            raise HubError(
                f"the fleet is registered ({', '.join(refs)}) but pushing it to {push_repo} failed: {exc}. Push it with: "
                f"mnist-peft push --repo-id {push_repo} {names_args} --root {shlex.quote(str(registry.root))}",
                repo_id=push_repo,
            ) from exc
        result.pushed = {"repo_id": pushed.repo_id, "commit": pushed.commit, "pushed": pushed.pushed}
    result.seconds = time.perf_counter() - start
    return result


def _accept(
    returned: list[FleetAdapter],
    jobs: Sequence[AdapterJob],
    base: MnistMLP,
    base_ref: str,
    fingerprint: str,
    failed: dict[str, str],
    *,
    data_dir: str | None,
    tmp: str,
) -> list[FleetAdapter]:
    """What Ray workers handed back, read as untrusted files. Only the tensor values are kept: each
    adapter that passes is loaded onto the driver's base, evaluated here, and written again by the
    driver (its config, metadata and card), as the local executor writes it. A folder that fails a
    check makes its job a failed one."""
    from pathlib import Path

    from mnist_peft.io.adapters import load_adapter, read_adapter

    if not returned:
        return []
    by_name = {j.name: j for j in jobs}
    test = load_mnist(train=False, data_dir=data_dir)
    before = evaluate(base, test)
    accepted = []
    for a in returned:
        job = by_name[a.name]
        try:
            files = read_adapter(a.folder)
            steps = _check_returned(files, job, fingerprint)
            model = LoraModel(copy.deepcopy(base))
            load_adapter(model, files, base_fingerprint=fingerprint)  # keys, shapes, finite values
            model.set_adapter("default")
            name, _ = job.resolved()
            result = AdapterTrainResult(job.digit, name, steps, 0.0, False, before, evaluate(model.eval(), test))
            accepted.append(_save(model, result, job, base_ref, str(Path(tmp) / "accepted" / job.name)))
        except Exception as exc:  # anything a malformed file can raise: this job failed, the others go on
            failed[a.name] = f"returned adapter refused: {exc}"[:1000]
    return accepted


def _check_returned(files, job: AdapterJob, fingerprint: str) -> int:
    """The adapter a worker returned is the job's: trained on the driver's base, for its digit, with
    the config the job's recipe makes, and a step count the recipe allows. Returns the steps."""
    import re

    _, recipe = job.resolved()
    meta = files.metadata
    got = meta.get("base_fingerprint")
    if got != fingerprint:
        raise FleetError(
            f"job {job.name} returned an adapter trained on another base (fingerprint {str(got)[:12]}..., the driver's is "
            f"{fingerprint[:12]}...); check that every worker reads the same base",
            failed={job.name: "trained on another base"},
        )
    expected = LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, init_lora_weights=recipe.init_lora_weights)
    cfg = files.config
    fields = ("r", "lora_alpha", "lora_dropout", "use_rslora", "bias")
    wrong = {k: getattr(cfg, k) for k in fields if getattr(cfg, k) != getattr(expected, k)}
    if sorted(cfg.target_modules) != sorted(expected.target_modules):
        wrong["target_modules"] = sorted(cfg.target_modules)
    if meta.get("digit") != str(job.digit):
        wrong["digit"] = meta.get("digit")
    steps = meta.get("steps", "")
    if not (re.fullmatch(r"[0-9]{1,9}", steps) and 1 <= int(steps) <= recipe.steps):
        wrong["steps"] = steps
    if wrong:
        raise FleetError(f"job {job.name} returned an adapter that is not the job's: {wrong}", failed={job.name: str(wrong)})
    return int(steps)


def _check_job(job: AdapterJob) -> None:
    """Every value a worker would trip over, checked on the driver before any work starts."""
    _, recipe = job.resolved()
    LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, init_lora_weights=recipe.init_lora_weights)  # r, alpha, init
    recipe.fit_config()  # batch size, lr, schedule, patience, eval_every
    if not (type(recipe.val_size) is int and 0 <= recipe.val_size < MNIST_TRAIN_SIZE):
        raise TrainConfigError(f"job {job.name}: val_size must be an integer in [0, {MNIST_TRAIN_SIZE}), got {recipe.val_size!r}")
    if not (type(recipe.seed) is int and 0 <= recipe.seed < 2**63):
        raise TrainConfigError(f"job {job.name}: seed must be an integer from 0 to 2**63 - 1, got {recipe.seed!r}")


MNIST_TRAIN_SIZE = 60_000


def _run_local(
    base: nn.Module, base_ref: str, jobs: Sequence[AdapterJob], tmp: str, *, data_dir: str | None, quiet: bool, tty: bool
) -> tuple[list[FleetAdapter], dict[str, str]]:
    from pathlib import Path

    totals = [j.resolved()[1].steps for j in jobs]
    bar = _Progress(jobs, unit_total=sum(totals), unit="step", tty=tty, quiet=quiet)

    def report(status: list[dict[str, object]]) -> None:
        done = sum(int(s["total"]) if s["state"] != "running" else int(s["step"]) for s in status)
        bar.update(status, done)

    try:
        out = train_batched(base, jobs, data_dir=data_dir, progress=report)
    finally:
        bar.close()
    return [_save(m, r, j, base_ref, str(Path(tmp) / j.name)) for j, (m, r) in zip(jobs, out, strict=True)], {}


def _run_ray(
    base_ref: str,
    source: str,
    jobs: Sequence[AdapterJob],
    tmp: str,
    *,
    data_dir: str | None,
    address: str | None,
    retries: int,
    quiet: bool,
    tty: bool,
    fault: tuple[str, ...] | None,
    revision: str | None = None,
) -> tuple[list[FleetAdapter], dict[str, str]]:

    try:
        import ray
    except ImportError as exc:
        raise InvalidArgumentError("the ray executor needs Ray: pip install -e '.[ray]' (or pip install 'mnist-peft[ray]')") from exc
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    elif address is not None:
        raise InvalidArgumentError("Ray is already initialised in this process; drop --ray-address or start a fresh process")
    try:
        return _collect(
            ray, base_ref, source, jobs, tmp, data_dir=data_dir, retries=retries, quiet=quiet, tty=tty, fault=fault, revision=revision
        )
    finally:
        if started:  # a Ray this call started (not a caller's) ends with it
            ray.shutdown()


def _collect(
    ray,
    base_ref: str,
    source: str,
    jobs: Sequence[AdapterJob],
    tmp: str,
    *,
    data_dir: str | None,
    retries: int,
    quiet: bool,
    tty: bool,
    fault: tuple[str, ...] | None,
    revision: str | None = None,
) -> tuple[list[FleetAdapter], dict[str, str]]:
    """Submit one task per job and gather them as they end (the progress bar moves per job)."""
    import os
    from pathlib import Path

    # Where workers find the Hub and the data, as the driver sees them (never a token: workers log in themselves).
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    if "MNIST_PEFT_DATA" in env:  # workers do not share the driver's working directory
        env["MNIST_PEFT_DATA"] = os.path.abspath(os.path.expanduser(env["MNIST_PEFT_DATA"]))
    task = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=True)(_train_one)
    if env:
        task = task.options(runtime_env={"env_vars": env})
    pending = {task.remote(j, base_ref, source, data_dir, fault, revision): j for j in jobs}
    status = {j.name: "pending" for j in jobs}
    bar = _Progress(jobs, unit_total=len(jobs), unit="job", tty=tty, quiet=quiet)
    trained: dict[str, FleetAdapter] = {}
    failed: dict[str, str] = {}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    got = ray.get(ref)
                    trained[job.name] = _receive(got, job, Path(tmp), revision=revision)
                    status[job.name] = "done"
                except Exception as exc:  # the job's own error after its retries, or a lost worker
                    failed[job.name] = _task_error(exc)
                    status[job.name] = "failed"
            bar.update([{"name": n, "state": s} for n, s in status.items()], len(trained) + len(failed))
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    return [trained[j.name] for j in jobs if j.name in trained], failed


_WORKER_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_XET", "MNIST_PEFT_DATA")
"""Environment a Ray worker gets from the driver: which Hub to read the base from, and the data root."""


def _task_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:300]


MAX_RETURNED_BYTES = 64 << 20
"""The most a worker may hand back for one adapter (an r=4 adapter is ~30 kB)."""


def _receive(got: object, job: AdapterJob, tmp, *, revision: str | None = None) -> FleetAdapter:
    """Write a worker's returned files into the driver's staging folder, checking their shape first
    (the files themselves are checked by :func:`_accept`), and that it read the base at ``revision``."""
    if isinstance(got, dict) and got.get("name") == job.name and isinstance(got.get("error"), str):
        raise FleetError(got["error"][:1000], failed={job.name: got["error"][:1000]})
    if not isinstance(got, dict) or got.get("name") != job.name or not isinstance(got.get("files"), dict):
        raise FleetError(f"job {job.name} returned something that is not a fleet result", failed={job.name: "bad result"})
    if got.get("base_revision") != revision:
        raise FleetError(
            f"job {job.name} read the base at commit {str(got.get('base_revision'))[:40]!r}, not at {revision!r}",
            failed={job.name: "other base commit"},
        )
    files = got["files"]
    if set(files) != set(ADAPTER_FILES) or not all(isinstance(b, bytes) for b in files.values()):
        raise FleetError(
            f"job {job.name} returned files {sorted(map(str, files))[:10]}; expected exactly {list(ADAPTER_FILES)} as bytes",
            failed={job.name: "bad files"},
        )
    if sum(len(b) for b in files.values()) > MAX_RETURNED_BYTES:
        raise FleetError(f"job {job.name} returned more than {MAX_RETURNED_BYTES >> 20} MB", failed={job.name: "too large"})
    folder = tmp / job.name
    folder.mkdir()
    for fname in ADAPTER_FILES:
        (folder / fname).write_bytes(files[fname])
    return FleetAdapter(job.name, job.digit, job.seed, 0, str(folder), {})

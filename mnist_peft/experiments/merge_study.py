"""One adapter for all ten digits: the task-vector merges of the ten digit adapters, compared.

Every choice is made on a validation split carved from the *training* set (the one the replay
recipe holds out, so the adapters never trained on it), by cross-entropy: the base has seen those
images, so accuracy on them sits near 1 and cannot choose, while the loss still moves. The test
set only reports:

- for each method (task arithmetic, TIES, DARE linear / TIES-style, magnitude prune) and each
  density, the ten adapters are merged at weight 1 each and truncated to rank ``r``; a common
  scale ``lambda`` (the papers' scaling coefficient) is then picked per (method, density) on the
  validation split. With equal weights every method is linear in ``lambda``, so one merge and one
  SVD serve every scale. The best (density, lambda) per method is evaluated on the test set;
- baselines: the base, the best single adapter (picked on validation), and the plain stack of all
  ten at weight 1/10 (exact, no truncation);
- a learned combination (LoraHub-style): ten weights found by a gradient-free search (seeded
  random coordinate steps, accepted when the validation loss falls), then truncated to rank r;
  the validation loss reported for it is the truncated adapter's, like its test row.

Models are evaluated with the merged update added to the base weights (what ``merge`` does). Each
evaluation is one forward pass of a split, counted for the progress callback.

The demo runs a coarser grid (:meth:`StudyConfig.demo`, stated in its report by :func:`grid_note`);
its points are points of the full grid, computed the same way, and the baseline and learned rows do
not depend on the grid.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.io.adapters import AdapterFiles
from mnist_peft.merging.combine import require_additive
from mnist_peft.merging.methods import DELTA_METHODS, get_merge_method, merge_deltas
from mnist_peft.merging.svd import svd_factors
from mnist_peft.model.data import MnistSplit, load_mnist, split_validation
from mnist_peft.training.loop import EvalResult, evaluate
from mnist_peft.tuners.lora.config import compute_scaling

__all__ = ["StudyConfig", "merge_study", "study_evaluations", "study_table", "grid_note"]

Progress = Callable[[int, int], None]
"""Called after every model evaluation with ``(done, total)``."""


@dataclass
class StudyConfig:
    densities: Sequence[float] = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    scales: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0)
    r: int = 4
    val_size: int = 5000
    """Held out of the training set with seed ``seed``: the replay recipe's own split."""
    seed: int = 0
    search_steps: int = 60

    @classmethod
    def quick(cls) -> StudyConfig:
        return cls(densities=(0.3,), scales=(0.1, 0.5, 1.0), val_size=2000, search_steps=4)

    @classmethod
    def demo(cls) -> StudyConfig:
        """The demo's grid: 3 of the 11 densities and 5 of the 12 scales (13 merges instead of 45, a
        quarter of the evaluations); the validation split and the search are the full study's."""
        return cls(densities=(0.01, 0.05, 0.3), scales=(0.1, 0.2, 0.5, 1.0, 2.0))


def _deltas(adapters: Sequence[AdapterFiles]) -> dict[str, list[torch.Tensor]]:
    """Per layer, each adapter's full update ``s B A`` (float32)."""
    modules = sorted({k.rsplit(".", 2)[0] for f in adapters for k in f.state_dict})
    out: dict[str, list[torch.Tensor]] = {}
    for m in modules:
        held = [f for f in adapters if f"{m}.lora_A.weight" in f.state_dict]
        shape = (held[0].state_dict[f"{m}.lora_B.weight"].shape[0], held[0].state_dict[f"{m}.lora_A.weight"].shape[1])
        out[m] = [
            (f.state_dict[f"{m}.lora_B.weight"].float() @ f.state_dict[f"{m}.lora_A.weight"].float())
            * compute_scaling(f.config.r, f.config.lora_alpha, f.config.use_rslora)
            if f"{m}.lora_A.weight" in f.state_dict
            else torch.zeros(shape)  # an adapter without this layer changes nothing there
            for f in adapters
        ]
    return out


def _updated(base: nn.Module, update: dict[str, torch.Tensor]) -> nn.Module:
    model = copy.deepcopy(base).eval()
    with torch.no_grad():
        for m, d in update.items():
            model.get_submodule(m).weight.add_(d)
    return model


def _evaluate_update(base: nn.Module, update: dict[str, torch.Tensor], split: MnistSplit) -> EvalResult:
    return evaluate(_updated(base, update), split)


def _val_loss(base: nn.Module, update: dict[str, torch.Tensor], split: MnistSplit) -> float:
    """Mean cross-entropy of the updated model on ``split`` (lower is better)."""
    with torch.no_grad():
        return float(F.cross_entropy(_updated(base, update)(split.x), split.y))


class _Evaluations:
    """The study's model evaluations (:func:`_val_loss`, :func:`_evaluate_update`: one forward pass of
    a split each), counted and reported to ``progress``."""

    def __init__(self, base: nn.Module, total: int, progress: Progress | None) -> None:
        self.base, self.total, self.progress, self.done = base, total, progress, 0

    def _counted(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))

    def val_loss(self, update: dict[str, torch.Tensor], split: MnistSplit) -> float:
        loss = _val_loss(self.base, update, split)
        self._counted()
        return loss

    def evaluate(self, update: dict[str, torch.Tensor] | None, split: MnistSplit) -> EvalResult:
        """Test metrics of the updated model (of the base itself for ``None``)."""
        result = evaluate(self.base, split) if update is None else _evaluate_update(self.base, update, split)
        self._counted()
        return result


def _low_rank(update: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    out = {}
    for m, d in update.items():
        A, B, _ = svd_factors(d, r)
        out[m] = B @ A
    return out


def _search(ev: _Evaluations, deltas: dict[str, list[torch.Tensor]], val: MnistSplit, cfg: StudyConfig) -> tuple[list[float], float]:
    """LoraHub-style: random coordinate steps on the ten weights, kept when the validation loss falls."""
    n = len(next(iter(deltas.values())))
    g = torch.Generator().manual_seed(cfg.seed)

    def loss(w: list[float]) -> float:
        return ev.val_loss({m: sum(wi * d for wi, d in zip(w, ds, strict=True)) for m, ds in deltas.items()}, val)

    best_w = [1.0 / n] * n
    best = loss(best_w)
    for _ in range(cfg.search_steps):
        i = int(torch.randint(n, (1,), generator=g))
        w = list(best_w)
        w[i] = max(-1.0, min(2.0, w[i] + float(torch.randn(1, generator=g)) * 0.2))
        s = loss(w)
        if s < best:
            best, best_w = s, w
    return best_w, best


def merge_study(
    base: nn.Module,
    adapters: Sequence[AdapterFiles],
    *,
    data_dir: str | None = None,
    config: StudyConfig | None = None,
    methods: Sequence[str] = DELTA_METHODS,
    progress: Progress | None = None,
    base_test: dict[str, object] | None = None,
) -> dict[str, object]:
    """Run the study (see the module docstring); returns every validation score and the test results.

    Args:
        progress: called after every model evaluation with ``(done, total)``.
        base_test: the base's test result (``evaluate(base).to_dict()``) where it is known already
            (the demo's base stage): not computed again.
    """
    cfg = config or StudyConfig()
    _, val = split_validation(load_mnist(train=True, data_dir=data_dir), cfg.val_size, seed=cfg.seed)
    test = load_mnist(train=False, data_dir=data_dir)
    require_additive(adapters, method="merge-study")  # a DoRA adapter is no delta s B A: refused by name
    deltas = _deltas(adapters)
    grid: list[dict[str, object]] = []
    curve: list[dict[str, object]] = []
    total = study_evaluations(cfg, methods, len(adapters), base_test_known=base_test is not None)
    ev = _Evaluations(base, total, progress)
    chosen = {method: _study_method(ev, deltas, method, cfg, val, test, n=len(adapters), grid=grid, curve=curve) for method in methods}
    return {
        "r": cfg.r,
        "val_size": cfg.val_size,
        "config": {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in asdict(cfg).items()},
        "adapters": [_adapter_label(f, i) for i, f in enumerate(adapters)],
        "grid": grid,
        "curve": curve,
        "chosen": chosen,
        **_baselines(ev, deltas, cfg, val, test, n=len(adapters), base_test=base_test),
    }


def study_evaluations(cfg: StudyConfig, methods: Sequence[str], n: int, *, base_test_known: bool = False) -> int:
    """How many model evaluations :func:`merge_study` makes: per merge, one per scale and one at the
    chosen scale (validation), and one on test; then the ``n`` single adapters, the search, the learned and the base's
    validation losses, and four test results (three when the base's is known)."""
    merges = sum(len(cfg.densities) if get_merge_method(m).needs_density else 1 for m in methods)
    return merges * (len(cfg.scales) + 2) + n + (cfg.search_steps + 1) + 2 + (3 if base_test_known else 4)


def _study_method(
    ev: _Evaluations,
    deltas: dict[str, list[torch.Tensor]],
    method: str,
    cfg: StudyConfig,
    val: MnistSplit,
    test: MnistSplit,
    *,
    n: int,
    grid: list[dict[str, object]],
    curve: list[dict[str, object]],
) -> dict[str, object]:
    """One method over its (density, scale) grid: every point's validation loss appended to ``grid``,
    each density's point at its best scale (scored on test) to ``curve``; returns the method's choice."""
    best = None
    tested: dict[tuple[float, float], EvalResult] = {}  # (density, scale) -> test result
    densities = tuple(cfg.densities) if get_merge_method(method).needs_density else (1.0,)  # the table says which take one
    for density in densities:
        g = torch.Generator().manual_seed(cfg.seed)
        merged = {m: merge_deltas(ds, [1.0] * n, method=method, density=density, generator=g) for m, ds in deltas.items()}
        low = _low_rank(merged, cfg.r)
        at_density = None
        for scale in cfg.scales:
            val_loss = ev.val_loss({m: scale * d for m, d in low.items()}, val)
            grid.append({"method": method, "density": density, "scale": scale, "val_loss": val_loss})
            if at_density is None or val_loss < at_density[0]:
                at_density = (val_loss, scale)
            if best is None or val_loss < best[0]:
                best = (val_loss, density, scale, low)
        point: tuple[float, float] = at_density  # type: ignore[assignment]
        tested[density, point[1]] = _curve_point(ev, low, method, density, point, val, test, curve=curve)
    val_loss, density, scale, low = best  # type: ignore[misc]
    # the best overall is the best at its density, scored above (but for NaN losses, where it need not be)
    result = tested.get((density, scale))
    if result is None:
        result = ev.evaluate({m: scale * d for m, d in low.items()}, test)
    return {
        "density": density,
        "scale": scale,
        "val_loss": val_loss,
        "test": result.to_dict(),
        # a choice on the grid's edge may have a better one beyond it
        "on_edge": [
            k
            for k, v, grid_values in (("density", density, densities), ("scale", scale, cfg.scales))
            if len(grid_values) > 1 and v in (min(grid_values), max(grid_values))
        ],
    }


def _curve_point(
    ev: _Evaluations,
    low: dict[str, torch.Tensor],
    method: str,
    density: float,
    at_density: tuple[float, float],
    val: MnistSplit,
    test: MnistSplit,
    *,
    curve: list[dict[str, object]],
) -> EvalResult:
    """What the plot shows: a density at the scale validation chose for it, scored on test (reported
    only; nothing is chosen on these numbers). Appends the point to ``curve``; returns the test result."""
    val_loss, scale = at_density
    update = {m: scale * d for m, d in low.items()}
    result = ev.evaluate(update, test)
    curve.append(
        {
            "method": method,
            "density": density,
            "scale": scale,
            "val_loss": val_loss,
            "val_accuracy": ev.evaluate(update, val).accuracy,
            "test_accuracy": result.accuracy,
        }
    )
    return result


def _baselines(
    ev: _Evaluations,
    deltas: dict[str, list[torch.Tensor]],
    cfg: StudyConfig,
    val: MnistSplit,
    test: MnistSplit,
    *,
    n: int,
    base_test: dict[str, object] | None,
) -> dict[str, object]:
    """The rows every method is compared with: the base, the best single adapter (on validation), the
    plain stack at 1/n, and the learned (searched, then truncated) combination."""
    single_val = [ev.val_loss({m: ds[i] for m, ds in deltas.items()}, val) for i in range(n)]
    best_single = min(range(n), key=lambda i: single_val[i])
    weights, search_val = _search(ev, deltas, val, cfg)
    learned = _low_rank({m: sum(w * d for w, d in zip(weights, ds, strict=True)) for m, ds in deltas.items()}, cfg.r)
    search_val = ev.val_loss(learned, val)  # the truncated adapter's, which the test row reports
    return {
        "base": {"val_loss": ev.val_loss({}, val), "test": base_test if base_test is not None else ev.evaluate(None, test).to_dict()},
        "best_single": {
            "index": best_single,
            "val_loss": single_val[best_single],
            "test": ev.evaluate({m: ds[best_single] for m, ds in deltas.items()}, test).to_dict(),
        },
        "stack_tenth": {"test": ev.evaluate({m: sum(ds) / n for m, ds in deltas.items()}, test).to_dict()},
        "learned": {"weights": weights, "val_loss": search_val, "test": ev.evaluate(learned, test).to_dict()},
    }


def _adapter_label(files: AdapterFiles, index: int) -> str:
    """``digit-9`` for a registry folder ``.../digit-9/v1``, else the folder's name, else its position."""
    if files.path is None:
        return f"adapter {index}"
    path = Path(files.path)
    return path.parent.name if path.name.startswith("v") and path.name[1:].isdigit() else path.name


def study_table(result: dict) -> list[str]:
    """Markdown rows: each method's chosen merge and the baselines, on the test set."""
    base_wrong = result["base"]["test"]["wrong_per_digit"]

    def row(label: str, test: dict, how: str) -> str:
        wrong = test["wrong_per_digit"]
        fewer = sum(w < b for w, b in zip(wrong, base_wrong, strict=True))
        more = sum(w > b for w, b in zip(wrong, base_wrong, strict=True))
        sign = "" if label == "base" else f" (sign test p {sign_test(fewer, more):.2f})"
        return f"| {label} | {how} | {test['accuracy']:.4f} | {' '.join(map(str, wrong))} | {fewer} / {more}{sign} |"

    lines = [
        f"| model (rank {result['r']}) | chosen on validation | test accuracy | wrong per digit 0..9 "
        "| digits with fewer / more errors than the base (two-sided sign test) |",
        "|---|---|---|---|---|",
        row("base", result["base"]["test"], "-"),
        row(f"best single adapter ({_single_label(result)})", result["best_single"]["test"], "lowest validation loss"),
        row("plain stack of all ten at 1/10 (exact)", result["stack_tenth"]["test"], "-"),
    ]
    for method, c in result["chosen"].items():
        edge = f" (grid edge: {', '.join(c['on_edge'])})" if c.get("on_edge") else ""
        lines.append(row(method, c["test"], f"density {c['density']:g}, scale {c['scale']:g}{edge}"))
    weights = ", ".join(f"{w:.2f}".replace("-0.00", "0.00") for w in result["learned"]["weights"])
    lines.append(row("learned weights (LoraHub-style search)", result["learned"]["test"], f"weights {weights}"))
    return lines


def sign_test(better: int, worse: int) -> float:
    """Two-sided sign test: the probability of a split at least this uneven between ``better`` and
    ``worse`` (ties left out) if each were a fair coin (10 digits, 8 / 2: p = 0.11; 9 / 1: p = 0.02)."""
    n, k = better + worse, min(better, worse)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def _single_label(result: dict) -> str:
    index = result["best_single"]["index"]
    names = result.get("adapters")
    return names[index] if names else f"adapter {index}"


def grid_note(result: dict) -> str | None:
    """A sentence saying how this result's grid differs from the full study's (None: it is the full one)."""
    cfg, full = result.get("config"), StudyConfig()
    if cfg is None or (list(cfg["densities"]) == list(full.densities) and list(cfg["scales"]) == list(full.scales)):
        return None
    shown = f"densities {', '.join(f'{v:g}' for v in cfg['densities'])} and scales {', '.join(f'{v:g}' for v in cfg['scales'])}"
    whole = f"{len(full.densities)} densities x {len(full.scales)} scales: `mnist-peft merge-study`, reported in docs/results.md"
    if cfg["val_size"] != full.val_size or cfg["search_steps"] != full.search_steps:
        return f"A smoke-test configuration, not the study's numbers: {shown}, a validation split of {cfg['val_size']} (the full grid: {whole})."
    return (
        f"This run evaluates a coarser grid than the full study: {shown} (the full grid: {whole}). Its points are "
        "points of the full grid, computed the same way; the base, single-adapter, stack and learned rows do not depend on the grid."
    )

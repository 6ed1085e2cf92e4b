"""The main job, end to end (``mnist-peft demo``): the seed's experiment, our answer, and the report.

Stages (each result is cached as JSON under ``<out>/stages/``; a re-run skips finished stages unless
``force``):

1. ``base``: the registry's reference base, or a freshly trained default-recipe base.
2. ``seed``: the seed notebook's experiment: seed-recipe base, digit-9 adapter with the seed
   recipe (r=1, A ~ N(0, 1), digit-9 images only), LoRA on / off, parameter counts.
3. ``replay``: the ten replay adapters (from the registry if they match the base, else trained),
   each evaluated: the 10 x 10 adapter x digit error-rate table.
4. ``combine``: a weighted stack, and the ten adapters combined by ``cat`` and by ``svd``.
5. ``exact``: LoRA off and unmerge give back the base bit for bit.
6. ``parity``: a short native-vs-peft parity summary.
7. ``svd``: LoRA extracted by SVD from a full fine-tune, accuracy vs rank.
8. ``merge``: the ten adapters merged into one, on the demo's grid (the full grid is ``merge-study``'s).

Then ``report.md`` and the PNG plots are written, and a one-screen summary is returned, with every
stage's time. The stages live in :mod:`.demo_stages`, the report and plots in :mod:`.demo_report`;
this module runs them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from mnist_peft.fileio import atomic_write_json, atomic_write_text
from mnist_peft.model.mlp import load_base
from mnist_peft.registry.adapter_registry import AdapterRegistry

from .demo_report import SEED_FACTS, demo_plots, demo_report
from .demo_stages import (
    DemoConfig,
    DemoRun,
    stage_base,
    stage_combine,
    stage_exact,
    stage_merge,
    stage_parity,
    stage_replay,
    stage_seed,
    stage_svd,
)

__all__ = ["DemoConfig", "run_demo", "summary_text", "SEED_FACTS"]


class _Stages:
    """The stages' cache: each result saved as ``<out>/stages/<name>.json``, a saved one reused."""

    def __init__(self, out: Path, force: bool, log: Callable[[str], None]) -> None:
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.force = force
        self.log = log
        self.timings: dict[str, float | None] = {}
        """Seconds per stage in order; None for one a former run had done (skipped)."""

    def run(self, name: str, fn: Callable[[], dict], *, needs: tuple[str, ...] = ()) -> dict:
        """``fn``'s result, or the one a former run saved (unless it lacks a key in ``needs``: an
        older version's, redone)."""
        path = self.dir / f"{name}.json"
        if path.exists() and not self.force:
            saved = json.loads(path.read_text())
            if all(k in saved for k in needs):
                self.log(f"[{name}] done before, skipped (--force to redo)")
                self.timings[name] = None
                return saved
            self.log(f"[{name}] saved by an older version of the demo: redone")
        self.log(f"[{name}] ...")
        start = time.perf_counter()
        result = fn()
        self.timings[name] = time.perf_counter() - start
        atomic_write_json(path, result)
        self.log(f"[{name}] {self.timings[name]:.1f} s")
        return result


def run_demo(
    out: str | Path = "demo-out",
    *,
    config: DemoConfig | None = None,
    root: str | Path | None = None,
    force: bool = False,
    data_dir: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, object]:
    """Run every stage, write ``report.md`` and the plots to ``out``, return the summary."""
    out = Path(out)
    cfg = config or DemoConfig()
    run = DemoRun(cfg, out / "models", _open_registry(cfg, root, log), force, data_dir, progress)
    start = time.perf_counter()
    stages = _Stages(out, force, log)
    results = _run_stages(stages, run)
    written = time.perf_counter()
    files = demo_plots(out, results, run.folders)
    atomic_write_text(out / "report.md", demo_report(results, run.folders))
    stages.timings["report"] = time.perf_counter() - written
    base_info, seed, replay = results["base"], results["seed"], results["replay"]
    return {
        "out": str(out),
        "seconds": round(time.perf_counter() - start, 1),
        "stages": {name: None if t is None else round(t, 1) for name, t in stages.timings.items()},
        "report": str(out / "report.md"),
        "plots": files,
        "base_accuracy": base_info["eval"]["accuracy"],
        "seed_lora_accuracy": seed["lora_on"]["accuracy"],
        "replay_accuracy": [r["eval"]["accuracy"] for r in replay["rows"]],
        "replay_target_wrong": [r["eval"]["wrong_per_digit"][r["digit"]] for r in replay["rows"]],
        "base_wrong": base_info["eval"]["wrong_per_digit"],
        "exact": results["exact"],
        "parity": f"{results['parity']['passed']}/{results['parity']['total']}",
    }


def _open_registry(cfg: DemoConfig, root: str | Path | None, log: Callable[[str], None]) -> AdapterRegistry | None:
    """The registry the demo reads its base and adapters from, or None: it trains what it needs."""
    registry = AdapterRegistry(root) if cfg.use_registry else None
    if registry is not None and not registry.root.is_dir():  # no registry here: the demo trains what it needs
        log(f"no registry at {str(registry.root)!r}: training the base and the adapters instead")
        registry = None
    return registry


def _run_stages(stages: _Stages, run: DemoRun) -> dict[str, object]:
    """Every stage's result by name, in order; each stage reads what the earlier ones left on ``run``."""
    results: dict = {}
    base_info = run.base_info = results["base"] = stages.run("base", partial(stage_base, run))
    run.base = load_base(base_info["path"])
    results["seed"] = stages.run("seed", partial(stage_seed, run))
    replay = results["replay"] = stages.run("replay", partial(stage_replay, run))
    run.folders = [Path(r["folder"]) for r in replay["rows"]]
    from .headroom import logit_offset_tradeoff  # the logit-offset reference for the same target (one pass: not cached)

    start = time.perf_counter()
    results["headroom"] = [r.to_dict() for r in logit_offset_tradeoff(run.base, data_dir=run.data_dir)]
    stages.timings["headroom"] = time.perf_counter() - start
    for name, stage in (("combine", stage_combine), ("exact", stage_exact), ("parity", stage_parity), ("svd", stage_svd)):
        results[name] = stages.run(name, partial(stage, run))
    results["merge"] = stages.run("merge", partial(stage_merge, run), needs=("curve", "config"))
    return results


def summary_text(summary: dict) -> str:
    """The one-screen summary printed at the end of the demo."""
    s = summary
    fixed = [
        f"{d}:{w0}->{w1}" for d, (w0, w1) in enumerate(zip([s["base_wrong"][d] for d in range(10)], s["replay_target_wrong"], strict=True))
    ]
    return "\n".join(
        [
            f"mnist-peft demo finished in {s['seconds']} s",
            "stages: " + ", ".join(f"{name} {'skipped (done before)' if t is None else f'{t} s'}" for name, t in s["stages"].items()),
            f"base accuracy {s['base_accuracy']:.4f}; the seed's digit-9 LoRA drops it to {s['seed_lora_accuracy']:.4f} (forgetting)",
            f"replay adapters, own-digit wrong before->after: {' '.join(fixed)}",
            f"replay adapters' overall accuracy: {' '.join(f'{a:.4f}' for a in s['replay_accuracy'])}",
            f"exact LoRA off / unmerge: {s['exact']['lora_off_equals_base']} / {s['exact']['unmerge_100_cycles_bit_exact']}; peft parity {s['parity']}",
            f"report: {s['report']}",
            f"plots: {', '.join(Path(p).name for p in s['plots'])}",
        ]
    )

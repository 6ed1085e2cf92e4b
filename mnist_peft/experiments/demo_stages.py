"""The demo's stages, one function each, and the state they hand on (see :mod:`.demo` for the run).

Each stage takes the run's :class:`DemoRun` (its settings and what the earlier stages produced) and
returns a JSON-able dict, which :mod:`.demo` caches under ``<out>/stages/``. Each shows its progress
(:class:`~mnist_peft.progress.Progress`: a bar on a terminal, a line every few seconds with an
estimate otherwise): training through its loop's own, every other count of work here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mnist_peft.io.adapters import ADAPTER_WEIGHTS_NAME, load_stack, read_adapter, save_adapter
from mnist_peft.model.mlp import base_fingerprint, count_parameters, load_base
from mnist_peft.progress import Progress
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.registry.refs import registry_folder
from mnist_peft.training.loop import EvalResult, evaluate
from mnist_peft.training.recipes import train_adapter, train_base
from mnist_peft.tuners.lora.model import LoraModel
from mnist_peft.tuners.lora.targets import lora_layers

__all__ = [
    "DemoConfig",
    "DemoRun",
    "stage_base",
    "stage_seed",
    "stage_replay",
    "stage_combine",
    "stage_exact",
    "stage_parity",
    "stage_merge",
    "stage_svd",
    "PROGRESS_EVERY",
]

PROGRESS_EVERY: float | None = None
"""Seconds between two progress lines of a stage when output is not a terminal (``None``: the
package's default, ``$MNIST_PEFT_PROGRESS_EVERY`` or 5 s)."""


@dataclass
class DemoConfig:
    """Sizes of the demo's work; ``quick()`` is a tiny configuration for tests."""

    base_epochs: float | None = None
    """Epochs of the default base when no registry base exists (None: the recipe's)."""
    seed_base_epochs: float = 1.0
    """Epochs of the seed-recipe base (1 = the seed's)."""
    adapter_steps: int | None = None
    """Steps of each replay adapter when trained here (None: the recipe's)."""
    parity_ranks: tuple[int, ...] = (1, 4)
    parity_steps: int = 20
    svd_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    svd_steps: int = 200
    stack: tuple[int, ...] = (3, 9)
    """Digits of the weighted stack evaluated in the combine stage."""
    svd_combine_rank: int = 8
    use_registry: bool = True
    merge_quick: bool = False
    """A small grid for the ten-adapter merge study (tests); else the demo's grid (``StudyConfig.demo``)."""

    @classmethod
    def quick(cls) -> DemoConfig:
        return cls(
            base_epochs=0.1,
            seed_base_epochs=0.05,
            adapter_steps=15,
            parity_ranks=(4,),
            parity_steps=3,
            svd_ranks=(1, 2),
            svd_steps=10,
            use_registry=False,
            merge_quick=True,
        )


@dataclass
class DemoRun:
    """One demo run: its settings, and what earlier stages produced for the later ones."""

    cfg: DemoConfig
    models: Path
    """Where the demo saves what it trains (``<out>/models``)."""
    registry: AdapterRegistry | None
    force: bool
    data_dir: str | None
    progress: bool
    """Progress shown (a bar on a terminal, lines otherwise); False: nothing."""
    base_info: dict = field(default_factory=dict)
    """The ``base`` stage's result."""
    base: torch.nn.Module | None = None
    """The base model, loaded from ``base_info["path"]``."""
    folders: list[Path] = field(default_factory=list)
    """The ten replay adapters' folders, digit 0 first (the ``replay`` stage's)."""

    def registry_adapter(self, d: int) -> Path | None:
        """The registry's digit-d adapter if it was trained on this base."""
        registry = self.registry
        folder = None if registry is None else registry_folder(f"digit-{d}", registry, "lora")
        if folder is not None and registry.get(f"digit-{d}").base_fingerprint == self.base_info["fingerprint"]:
            return folder
        return None

    def adapter_folder(self, d: int) -> Path:
        """The registry's digit-d adapter if it was trained on this base, else the demo's own."""
        return self.registry_adapter(d) or self.models / f"digit-{d}"

    def bar(self, total: int, desc: str, unit: str) -> Progress:
        """A stage's progress over ``total`` units of work (shown as :attr:`progress` says)."""
        return Progress(total, desc, enabled=self.progress, unit=unit, every=PROGRESS_EVERY)


def stage_base(run: DemoRun) -> dict:
    """1. The registry's base, or a freshly trained default-recipe one."""
    registry, data_dir = run.registry, run.data_dir
    path = None if registry is None else registry_folder("base", registry, "base")
    if path is not None:
        model = load_base(path)
        source = f"registry {registry.get('base').ref}"
    else:
        model, _ = train_base("default", data_dir=data_dir, progress=run.progress, epochs=run.cfg.base_epochs)
        path = run.models / "base"
        model.save_pretrained(path)
        source = "trained (default recipe)"
    r = evaluate(model, data_dir=data_dir)
    return {"path": str(path), "source": source, "fingerprint": base_fingerprint(model), "eval": r.to_dict()}


def stage_seed(run: DemoRun) -> dict:
    """2. The seed's experiment: seed-recipe base, digit-9 seed adapter, LoRA on and off."""
    data_dir, progress = run.data_dir, run.progress
    seed_base, _ = train_base("seed", data_dir=data_dir, progress=progress, epochs=run.cfg.seed_base_epochs)
    seed_base.save_pretrained(run.models / "seed-base")
    model, res = train_adapter(seed_base, 9, "seed", data_dir=data_dir, progress=progress)
    save_adapter(model, run.models / "seed-digit-9", metadata={"digit": "9", "recipe": "seed"})
    with model.disable_adapter():
        off = evaluate(model, data_dir=data_dir)
    return {
        "before": res.before.to_dict(),
        "lora_on": res.after.to_dict(),
        "lora_off": off.to_dict(),
        "lora_off_equals_before": off.wrong_per_digit == res.before.wrong_per_digit and off.confusion == res.before.confusion,
        "lora_parameters": model.num_lora_parameters(),
        "total_parameters": count_parameters(model),
        "base_parameters": count_parameters(seed_base),
    }


def _train_missing_adapters(run: DemoRun) -> dict[int, EvalResult]:
    """The digit adapters neither the registry nor an earlier run has, trained together by the
    fleet's batched trainer (each equals its solo ``train_adapter`` run); their test results."""
    from mnist_peft.training.batched import AdapterJob, train_batched

    todo = [
        d
        for d in range(10)
        if run.registry_adapter(d) is None and (run.force or not (run.models / f"digit-{d}" / ADAPTER_WEIGHTS_NAME).exists())
    ]
    if not todo:
        return {}
    steps = () if run.cfg.adapter_steps is None else (("steps", run.cfg.adapter_steps),)
    jobs = [AdapterJob(d, "replay", steps) for d in todo]
    with run.bar(sum(j.resolved()[1].steps for j in jobs), "replay: training", "step") as bar:

        def shown(status: list[dict[str, object]]) -> None:  # a job stopped early counts all its steps
            bar.update(sum(int(s["total" if s["state"] not in ("running", "pending") else "step"]) for s in status) - bar.n)

        trained = train_batched(run.base, jobs, data_dir=run.data_dir, progress=shown)
    for d, (model, _) in zip(todo, trained, strict=True):
        save_adapter(model, run.models / f"digit-{d}", metadata={"digit": str(d), "recipe": "replay"})
    # the saved tensors are the trained ones (float32 both): the test scores train_batched made stand
    return {d: result.after for d, (_, result) in zip(todo, trained, strict=True)}


def stage_replay(run: DemoRun) -> dict:
    """3. The ten replay adapters, each evaluated: the adapter x digit table."""
    scored = _train_missing_adapters(run)
    rows = []
    with run.bar(10 - len(scored), "replay", "evaluation") as bar:
        for d in range(10):
            folder = run.adapter_folder(d)
            r = scored.get(d)
            if r is None:
                r = evaluate(load_stack(copy.deepcopy(run.base), [folder]), data_dir=run.data_dir)
                bar.update()
            rows.append({"digit": d, "folder": str(folder), "eval": r.to_dict()})
    return {"rows": rows}


def stage_combine(run: DemoRun) -> dict:
    """4. A weighted stack (unmerged and merged), and the ten adapters by cat and by svd."""
    from mnist_peft.merging.combine import combine_adapters

    base, folders, cfg, data_dir = run.base, run.folders, run.cfg, run.data_dir
    with run.bar(4, "combine", "evaluation") as bar:
        stack = load_stack(copy.deepcopy(base), [folders[d] for d in cfg.stack], [1.0] * len(cfg.stack))
        unmerged = evaluate(stack, data_dir=data_dir)
        bar.update()
        stack.merge()
        merged = evaluate(stack, data_dir=data_dir)
        bar.update()
        files = [read_adapter(f) for f in folders]
        results = {}
        for method, r in (("cat", None), ("svd", cfg.svd_combine_rank)):
            comb = combine_adapters(files, method=method, r=r)
            model = LoraModel(copy.deepcopy(base))
            model.add_adapter("combined", comb.config, state_dict=comb.state_dict)
            results[method] = {
                "r": comb.config.r,
                "relative_error": comb.relative_error,
                "eval": evaluate(model, data_dir=data_dir).to_dict(),
            }
            bar.update()
    return {"stack_digits": list(cfg.stack), "stack_unmerged": unmerged.to_dict(), "stack_merged": merged.to_dict(), **results}


def stage_exact(run: DemoRun) -> dict:
    """5. LoRA off and 100 merge/unmerge cycles give the base back bit for bit."""
    base = run.base
    model = load_stack(copy.deepcopy(base), [run.folders[9]])
    x = torch.randn(256, 784, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y_base = base(x)
        changed = not torch.equal(model(x), y_base)
        with model.disable_adapter():
            off_equal = torch.equal(model(x), y_base)
        originals = [layer.base_layer.weight.detach().clone() for _, layer in lora_layers(model.model)]
        for _ in range(100):
            model.merge()
            model.unmerge()
        unmerge_equal = all(
            torch.equal(a, layer.base_layer.weight) for a, (_, layer) in zip(originals, lora_layers(model.model), strict=True)
        )
    return {"adapter_changes_output": changed, "lora_off_equals_base": off_equal, "unmerge_100_cycles_bit_exact": unmerge_equal}


def stage_parity(run: DemoRun) -> dict:
    """6. A short native-vs-peft parity run."""
    from mnist_peft.io.peft_compat import default_cases, run_parity
    from mnist_peft.model.data import load_mnist

    data = load_mnist(train=True, data_dir=run.data_dir)
    n = run.cfg.parity_steps * 32
    cases = default_cases(run.cfg.parity_ranks)
    res = []
    with run.bar(len(cases), "parity", "case") as bar:
        for case in cases:  # one at a time for the progress line: each case seeds itself, so the same results
            res += run_parity(run.base, data.x[:n], data.y[:n], [case], steps=run.cfg.parity_steps)
            bar.update()
    return {"cases": [r.to_dict() for r in res], "passed": sum(r.passed for r in res), "total": len(res)}


def stage_merge(run: DemoRun) -> dict:
    """8. The ten replay adapters merged into one by each method, chosen on validation, reported on test:
    on the demo's grid (stated in the report), the base's test result taken from the base stage."""
    from mnist_peft.merging.methods import DELTA_METHODS

    from .merge_study import StudyConfig, merge_study, study_evaluations

    files = [read_adapter(f) for f in run.folders]
    config = StudyConfig.quick() if run.cfg.merge_quick else StudyConfig.demo()
    total = study_evaluations(config, DELTA_METHODS, len(files), base_test_known=True)
    with run.bar(total, "merge", "evaluation") as bar:
        return merge_study(
            run.base,
            files,
            data_dir=run.data_dir,
            config=config,
            progress=lambda done, _: bar.update(done - bar.n),
            base_test=run.base_info["eval"],
        )


def stage_svd(run: DemoRun) -> dict:
    """7. LoRA by SVD of a full fine-tune: accuracy vs rank."""
    from .svd_sweep import rank_sweep

    cfg = run.cfg
    bars: list[Progress] = []  # the ranks' own, from the end of the fine-tune (which shows its steps itself)

    def shown(done: int, total: int) -> None:
        if not bars:
            bars.append(run.bar(total, "svd", "rank"))
        bars[0].update(done - bars[0].n)

    try:
        return rank_sweep(run.base, 9, cfg.svd_ranks, steps=cfg.svd_steps, data_dir=run.data_dir, progress=run.progress, on_rank=shown)
    finally:
        for bar in bars:
            bar.close()

"""The forgetting study (``mnist-peft forgetting-study``): do new signal (elastic distortions of the
digit's images) and updates kept out of the other digits' way (the null-space projection of A) let a
per-digit adapter fix its digit without hurting the others?

The rules:

- **Chosen on validation.** The registry's base saw every training image (it fits them at 99.89%), so
  a split of the training set cannot tell forgetting on it. The study therefore trains a *study base*
  the same way (the ``default`` base recipe, seed 0) on the training set less the replay recipe's own
  validation split (5,000 images, seed 0), trains each candidate's ten adapters on it (seed 0, which
  holds out the same split), and scores them on that split, which neither saw: digits meeting both
  targets, then the digit errors left. Chosen: the elastic distortion's ``alpha``, the null-space
  ``energy``; the combined recipe takes both chosen values.
- **Reported on test.** Each recipe, with its chosen values, trains ten adapters on the registry's
  base for seeds 0, 1 and 2 (fixed before looking); a digit meets both targets on the seed mean when
  its mean test errors are cut by >= 40% and its mean accuracy is not below the base's.
- **The same budget** as replay: rank, steps, batches and early stopping are replay's; only the
  distortion and the projection change. Time per adapter: a batched run's time over its ten adapters.

Every adapter is trained by the batched trainer, which equals ``train_adapter`` bit for bit
(``tests/test_forgetting_recipes.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnist_peft.model.data import MnistSplit, load_mnist, split_validation
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.training.batched import AdapterJob, train_batched
from mnist_peft.training.loop import TrainConfig, evaluate, fit

__all__ = ["CUT", "ForgettingConfig", "forgetting_study", "meets_both", "study_table"]

CUT = 0.4  # a digit's errors cut by at least this share ...
# ... and the overall accuracy not below the base's: both targets of a per-digit adapter.


@dataclass(frozen=True)
class ForgettingConfig:
    seeds: Sequence[int] = (0, 1, 2)
    digits: Sequence[int] = tuple(range(10))
    alphas: Sequence[float] = (8.0, 20.0, 34.0)
    """Elastic ``alpha`` candidates (pixels; sigma 4); Simard et al.'s MNIST value is 34."""
    energies: Sequence[float] = (0.9, 0.99, 0.999)
    """Null-space candidates: the share of the other digits' input energy kept out of A."""
    val_size: int = 5000
    base_epochs: float = 5
    """The study base's epochs (the registry base's recipe: 5)."""
    overrides: tuple[tuple[str, object], ...] = ()
    """Recipe fields for every adapter (the quick run's fewer steps)."""

    @classmethod
    def quick(cls) -> ForgettingConfig:
        return cls(
            seeds=(0,), digits=(8, 9), alphas=(34.0,), energies=(0.99,), base_epochs=0.25, overrides=(("steps", 20), ("eval_every", 10))
        )


def meets_both(base_wrong: float, base_accuracy: float, wrong: float, accuracy: float) -> bool:
    """Both targets: the digit's errors cut by >= 40% and the overall accuracy not below the base's."""
    return wrong <= (1 - CUT) * base_wrong and accuracy >= base_accuracy


def study_base(out: Path, *, data_dir: str | None, val_size: int, epochs: float = 5) -> tuple[MnistMLP, MnistSplit]:
    """The base recipe (``default``, seed 0) on the training set less the replay recipe's validation
    split (seed 0), and that split; saved to ``out/study-base`` and read back on a later run."""
    from mnist_peft.model.mlp import load_base

    train, val = split_validation(load_mnist(train=True, data_dir=data_dir), val_size, seed=0)
    folder, made = out / "study-base", {"epochs": epochs, "val_size": val_size, "seed": 0}
    record = folder / "study.json"
    if (folder / "model.safetensors").is_file() and record.is_file() and json.loads(record.read_text()) == made:
        return load_base(folder), val  # the same study base, trained by an earlier run
    torch.manual_seed(0)
    model = MnistMLP()
    fit(model, train, TrainConfig(epochs=epochs, batch_size=128, lr=2e-3, seed=0, schedule="onecycle"))
    model.save_pretrained(folder)
    record.write_text(json.dumps(made))
    return model.eval(), val


def run_recipe(
    base: nn.Module,
    recipe: str,
    overrides: dict[str, object],
    seed: int,
    cfg: ForgettingConfig,
    *,
    data_dir: str | None,
    split: MnistSplit | None = None,
    save: Path | None = None,
) -> list[dict[str, Any]]:
    """Ten adapters (one per digit of ``cfg``) of ``recipe`` on ``base``, batched; per digit its own
    test errors and test accuracy, and, given ``split``, the same on it."""
    fields = {**dict(cfg.overrides), **overrides, "seed": seed, "val_size": cfg.val_size}  # the held-out split is the study base's
    jobs = [AdapterJob(d, recipe, tuple(sorted(fields.items())), name=f"digit-{d}") for d in cfg.digits]
    started = time.perf_counter()
    trained = train_batched(base, jobs, data_dir=data_dir)
    seconds = time.perf_counter() - started
    rows = []
    for job, (model, result) in zip(jobs, trained, strict=True):
        row: dict[str, Any] = {
            "digit": job.digit,
            "seed": seed,
            "wrong": result.after.wrong_per_digit[job.digit],
            "accuracy": result.after.accuracy,
            "steps": result.steps,
            "seconds": seconds / len(jobs),
        }
        if result.null_space is not None:
            row["null_space"] = result.null_space
        if split is not None:
            on = evaluate(model, split)
            row["val_wrong"], row["val_accuracy"] = on.wrong_per_digit[job.digit], on.accuracy
        if save is not None:
            from mnist_peft.training.recipes import save_trained_adapter

            save_trained_adapter(model, result, save / f"digit-{job.digit}", base_model="base")
        rows.append(row)
    return rows


def _val_score(rows: list[dict[str, Any]], base_val: Any) -> tuple[int, int]:
    met = sum(meets_both(base_val.wrong_per_digit[r["digit"]], base_val.accuracy, r["val_wrong"], r["val_accuracy"]) for r in rows)
    return met, -sum(r["val_wrong"] for r in rows)


def select(base: nn.Module, val: MnistSplit, cfg: ForgettingConfig, *, data_dir: str | None, say: Callable[[str], None]) -> dict[str, Any]:
    """Each candidate's ten adapters on the study base, scored on the held-out split; the chosen values."""
    base_val = evaluate(base, val)
    tried: dict[str, list[dict[str, Any]]] = {}

    def trial(label: str, recipe: str, overrides: dict[str, object]) -> tuple[int, int]:
        rows = run_recipe(base, recipe, overrides, 0, cfg, data_dir=data_dir, split=val)
        score = _val_score(rows, base_val)
        tried[label] = [{"recipe": recipe, **overrides, "met": score[0], "val_wrong": -score[1]}]
        say(f"[forgetting] validation: {label}: {score[0]}/{len(rows)} digits meet both, {-score[1]} errors left")
        return score

    alpha = max(cfg.alphas, key=lambda a: trial(f"elastic alpha={a:g}", "elastic", {"elastic_alpha": a}))
    energy = max(cfg.energies, key=lambda e: trial(f"null-space energy={e:g}", "null-space", {"null_space_energy": e}))
    trial("elastic-null-space", "elastic-null-space", {"elastic_alpha": alpha, "null_space_energy": energy})
    for recipe in ("replay", "replay-affine"):
        trial(recipe, recipe, {})
    return {
        "alpha": alpha,
        "energy": energy,
        "base_val": {"accuracy": base_val.accuracy, "wrong_per_digit": base_val.wrong_per_digit},
        "tried": tried,
    }


def forgetting_study(
    registry_base: nn.Module,
    out: str | Path,
    *,
    data_dir: str | None = None,
    config: ForgettingConfig | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Choose on validation, then train every recipe on the registry's base for each seed; writes
    ``out/forgetting.json`` and each recipe's seed-0 adapters to ``out/adapters/<recipe>/``."""
    cfg = config or ForgettingConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base, val = study_base(out, data_dir=data_dir, val_size=cfg.val_size, epochs=cfg.base_epochs)
    chosen = select(base, val, cfg, data_dir=data_dir, say=say)
    recipes = {
        "replay": {},
        "replay-affine": {},
        "elastic": {"elastic_alpha": chosen["alpha"]},
        "null-space": {"null_space_energy": chosen["energy"]},
        "elastic-null-space": {"elastic_alpha": chosen["alpha"], "null_space_energy": chosen["energy"]},
    }
    base_test = evaluate(registry_base, load_mnist(train=False, data_dir=data_dir))
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in recipes}
    for seed in cfg.seeds:  # seeds outermost: the null-space recipes share each seed's spectra
        for name, overrides in recipes.items():
            save = out / "adapters" / name if seed == cfg.seeds[0] else None
            rows[name] += run_recipe(registry_base, name, overrides, seed, cfg, data_dir=data_dir, save=save)
            met = _table(rows[name], base_test, cfg)["met"]
            say(f"[forgetting] test: {name} seed {seed}: {met} digits meet both on the mean so far ({time.perf_counter() - started:.0f} s)")
    result = {
        "config": asdict(cfg),
        "chosen": chosen,
        "recipes": {name: {"overrides": recipes[name], "rows": rows[name], **_table(rows[name], base_test, cfg)} for name in recipes},
        "base_test": {"accuracy": base_test.accuracy, "wrong_per_digit": base_test.wrong_per_digit},
        "seconds": time.perf_counter() - started,
    }
    (out / "forgetting.json").write_text(json.dumps(result, indent=1))
    return result


def _table(rows: list[dict[str, Any]], base_test: Any, cfg: ForgettingConfig) -> dict[str, Any]:
    """Per digit, the seed mean of its test errors and accuracy, and whether it meets both targets."""
    digits = []
    for d in cfg.digits:
        mine = [r for r in rows if r["digit"] == d]
        if not mine:
            continue
        wrong = sum(r["wrong"] for r in mine) / len(mine)
        accuracy = sum(r["accuracy"] for r in mine) / len(mine)
        digits.append(
            {
                "digit": d,
                "wrong": wrong,
                "accuracy": accuracy,
                "per_seed": [(r["seed"], r["wrong"], r["accuracy"]) for r in mine],
                "met": meets_both(base_test.wrong_per_digit[d], base_test.accuracy, wrong, accuracy),
                "seconds": sum(r["seconds"] for r in mine) / len(mine),
            }
        )
    return {"digits": digits, "met": sum(d["met"] for d in digits)}


def study_table(result: dict[str, Any]) -> list[str]:
    """The results page's table: per digit, base errors, then each recipe's seed-mean errors and accuracy."""
    names = list(result["recipes"])
    base = result["base_test"]
    lines = [
        "| digit | base wrong | " + " | ".join(f"{n}: wrong, accuracy" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    by = {n: {d["digit"]: d for d in result["recipes"][n]["digits"]} for n in names}
    for d in sorted(by[names[0]]):
        cells = [f"{by[n][d]['wrong']:.1f}, {by[n][d]['accuracy']:.4f}{' *' if by[n][d]['met'] else ''}" for n in names]
        lines.append(f"| {d} | {base['wrong_per_digit'][d]} | " + " | ".join(cells) + " |")
    lines.append("| meets both (seed mean) | | " + " | ".join(f"{result['recipes'][n]['met']}/{len(by[n])}" for n in names) + " |")
    return lines

"""Recipes: named ways to train a base or a per-digit adapter, registered by name.

A recipe is anything with a ``name``, a ``kind`` (``"base"`` or ``"adapter"``) and a one-line
``summary`` (:class:`Recipe`); :func:`register_recipe` adds one, and the CLI's ``--recipe`` choices
are :func:`recipe_names`. Built in:

- base ``seed`` (the seed notebook: batch 10, one epoch, Adam 1e-3) and ``default`` (batch 128,
  five epochs, one-cycle);
- adapter ``seed`` (the notebook's digit-only training) and ``replay`` (digit batches mixed with
  replayed other digits, augmented, distilled toward the base, early-stopped).

A new recipe: an instance of :class:`BaseRecipe` (a :class:`~mnist_peft.training.loop.TrainConfig` for
:func:`~mnist_peft.training.loop.fit`) or of :class:`AdapterRecipe`, passed to :func:`register_recipe`.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import torch
from torch import nn

from mnist_peft.errors import InvalidArgumentError, TrainConfigError
from mnist_peft.model.data import MnistSplit, load_mnist, split_validation
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.numerics import check_seed
from mnist_peft.tuners.dora.config import DoraConfig
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel
from mnist_peft.tuners.lora.targets import check_rank

from .augment import DISTORTIONS, augment_batch
from .loop import EvalResult, FitResult, TrainConfig, check_batch_size, evaluate, fit
from .task import DigitTask

__all__ = [
    "Recipe",
    "BaseRecipe",
    "AdapterRecipe",
    "register_recipe",
    "recipe_names",
    "get_recipe",
    "BASE_RECIPES",
    "ADAPTER_RECIPES",
    "AdapterTrainResult",
    "save_trained_adapter",
    "train_base",
    "train_adapter",
    "check_resume_type",
    "finetune_full",
    "augment_batch",
    "resolve_recipe",
    "DigitTask",
]

RecipeKind = Literal["base", "adapter"]


class Recipe(Protocol):
    """What the recipe registry holds: a name, a kind, a one-line summary."""

    name: str
    kind: RecipeKind
    summary: str


@dataclass(frozen=True)
class BaseRecipe:
    """A way to train a base model: the :class:`TrainConfig` that :func:`fit` runs."""

    name: str
    summary: str
    config: TrainConfig
    kind: RecipeKind = "base"


_RECIPES: dict[str, dict[str, Recipe]] = {"base": {}, "adapter": {}}
BASE_RECIPES: dict[str, Recipe] = _RECIPES["base"]  # name -> recipe, filled by register_recipe
ADAPTER_RECIPES: dict[str, Recipe] = _RECIPES["adapter"]


def register_recipe(recipe: Recipe) -> Recipe:
    """Add ``recipe`` under its kind and name (a name is taken once per kind)."""
    if recipe.kind not in _RECIPES:
        raise TrainConfigError(f"recipe kind must be 'base' or 'adapter', got {recipe.kind!r}")
    wanted = BaseRecipe if recipe.kind == "base" else AdapterRecipe
    if not isinstance(recipe, wanted):
        raise TrainConfigError(f"a {recipe.kind} recipe must be a {wanted.__name__} (what training reads), got {type(recipe).__name__}")
    if recipe.name in _RECIPES[recipe.kind]:
        raise TrainConfigError(f"a {recipe.kind} recipe named {recipe.name!r} exists already")
    _RECIPES[recipe.kind][recipe.name] = recipe
    return recipe


def recipe_names(kind: RecipeKind) -> list[str]:
    """The registered recipes of ``kind``, in registration order (what ``--recipe`` accepts)."""
    if kind not in _RECIPES:
        raise TrainConfigError(f"recipe kind must be 'base' or 'adapter', got {kind!r}")
    return list(_RECIPES[kind])


def get_recipe(kind: RecipeKind, name: str) -> Recipe:
    """The recipe ``name`` of ``kind``.

    Raises:
        TrainConfigError: no such recipe (the message lists the ones there are).
    """
    try:
        return _RECIPES[kind][name]
    except KeyError:
        raise TrainConfigError(f"unknown {kind} recipe {name!r}; choose one of {', '.join(_RECIPES.get(kind, {}))}") from None


register_recipe(
    BaseRecipe(
        "seed", "the seed notebook's: batch 10, 1 epoch, Adam 1e-3", TrainConfig(epochs=1, batch_size=10, lr=1e-3, seed=0, schedule="none")
    )
)
register_recipe(
    BaseRecipe(
        "default",
        "ours: batch 128, 5 epochs, one-cycle LR (>= 0.985 in well under a minute)",
        TrainConfig(epochs=5, batch_size=128, lr=2e-3, seed=0, schedule="onecycle"),
    )
)


def train_base(
    recipe: str | BaseRecipe | TrainConfig = "default",
    *,
    data_dir: str | None = None,
    progress: bool = False,
    **overrides: object,
) -> tuple[MnistMLP, FitResult]:
    """Train a fresh :class:`MnistMLP` on the MNIST training set with a named recipe.

    Example:
        >>> model, result = train_base("default")
        >>> evaluate(model).accuracy  # >= 0.985
    """
    if isinstance(recipe, str):
        config = get_recipe("base", recipe).config  # type: ignore[attr-defined]
    elif isinstance(recipe, BaseRecipe):
        config = recipe.config
    else:
        config = recipe
    config = TrainConfig(**{**asdict(config), **{k: v for k, v in overrides.items() if v is not None}})
    train = load_mnist(train=True, data_dir=data_dir)
    val = None
    if config.val_size:
        train, val = split_validation(train, config.val_size, seed=config.seed)
    torch.manual_seed(config.seed)  # as the seed notebook: seed once, then build the model
    model = MnistMLP()
    result = fit(model, train, config, val=val, progress=progress, desc="train-base")
    return model, result


# ----------------------------------------------------------------------------- adapter recipes
@dataclass
class AdapterRecipe:
    """How to train one per-digit LoRA adapter (its fields can be overridden one by one)."""

    r: int = 4
    """LoRA rank on every target layer."""
    lora_alpha: float = 8
    """LoRA alpha (scaling = lora_alpha / r)."""
    init_lora_weights: bool | str = True
    """peft-style init (True), "gaussian", or the seed notebook's "seed" (A ~ N(0, 1))."""
    use_dora: bool = False
    """Train a DoRA adapter (:class:`~mnist_peft.tuners.dora.config.DoraConfig`: LoRA plus a magnitude
    vector per layer) instead of a LoRA one (``--use-dora``)."""
    steps: int = 400
    """Optimiser steps."""
    batch_size: int = 128
    """Samples per step."""
    lr: float = 2e-3
    """Adam learning rate (peak of the one-cycle schedule)."""
    schedule: str = "onecycle"
    """``none`` or ``onecycle``."""
    digit_fraction: float = 0.7
    """Share of each batch drawn from the target digit; the rest replays the other digits.
    1.0 trains on the digit alone (the seed recipe, which forgets the others)."""
    augment: bool = False
    """Random small affine transforms (rotation, scale, shift) of every training image."""
    distortion: str = "none"
    """Distort the digit's own training images (the replayed ones stay as they are): ``"none"``,
    ``"affine"`` (the control) or ``"elastic"`` (Simard et al. 2003; :mod:`~mnist_peft.training.augment`)."""
    elastic_alpha: float = 34.0
    """Elastic distortion: the displacement field's scale, in pixels (Simard et al.'s MNIST value)."""
    elastic_sigma: float = 4.0
    """Elastic distortion: the width of the Gaussian that smooths the field, in pixels."""
    null_space_energy: float = 0.0
    """Keep the adapter's A off the directions holding this share of the other digits' layer inputs
    (e.g. 0.99; 0: off): :mod:`~mnist_peft.training.nullspace`."""
    distill: float = 2.0
    """Weight of a KL term pulling the adapted model toward the base on replayed digits."""
    val_size: int = 5000
    """Training images held out for early stopping (0 disables it)."""
    eval_every: int = 50
    """Steps between validation checks (the recipe's own objective on the held-out split)."""
    patience: int = 3
    """Checks without gain before stopping early."""
    seed: int = 0
    """Seeds adapter init, batches and augmentation."""
    name: str = "custom"
    """The name it is registered under."""
    summary: str = ""
    """One line for ``mnist-peft info``."""
    kind: RecipeKind = "adapter"

    def adapter_config(self) -> LoraConfig:
        """The adapter's config: :class:`LoraConfig`, or :class:`DoraConfig` with ``use_dora``."""
        config_class = DoraConfig if self.use_dora is True else LoraConfig
        return config_class(r=self.r, lora_alpha=self.lora_alpha, init_lora_weights=self.init_lora_weights)

    def fit_config(self) -> TrainConfig:
        """The knobs :func:`~mnist_peft.training.loop.fit` runs this recipe with (steps bound the run)."""
        return TrainConfig(
            epochs=1e9,
            batch_size=self.batch_size,
            lr=self.lr,
            seed=self.seed,
            schedule=self.schedule,
            max_steps=self.steps,
            val_size=self.val_size,
            patience=self.patience,
            eval_every=self.eval_every,
        )

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise TrainConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0 < self.digit_fraction <= 1:
            raise TrainConfigError(f"digit_fraction must be in (0, 1], got {self.digit_fraction}")
        if self.steps < 1 or self.batch_size < 1:
            raise TrainConfigError("steps and batch_size must be >= 1")
        if not isinstance(self.use_dora, bool):
            raise TrainConfigError(f"use_dora must be true or false, got {self.use_dora!r}")
        if self.distortion not in DISTORTIONS:
            raise TrainConfigError(f"distortion must be one of {DISTORTIONS}, got {self.distortion!r}")
        if not (0 < self.elastic_alpha <= 100 and 0.5 <= self.elastic_sigma <= 10):
            raise TrainConfigError(
                f"elastic_alpha must be in (0, 100] and elastic_sigma in [0.5, 10], got {self.elastic_alpha}, {self.elastic_sigma}"
            )
        if not (self.null_space_energy == 0 or 0 < self.null_space_energy < 1):
            raise TrainConfigError(f"null_space_energy must be 0 (off) or in (0, 1), got {self.null_space_energy!r}")
        if self.null_space_energy and self.use_dora:  # DoRA's magnitudes rescale whole rows: dW = dW P no longer bounds anything
            raise TrainConfigError("the null-space projection is for LoRA adapters: drop --use-dora, or pick a recipe without it")
        check_batch_size(self.batch_size)  # bounds checked here, before any data is loaded or memory taken
        check_seed(self.seed, name="seed (--seed)", error=TrainConfigError)


# The seed notebook: only digit-D images, batch 10, 100 steps, r=1, alpha=1, A ~ N(0, 1), Adam 1e-3.
register_recipe(
    AdapterRecipe(
        r=1,
        lora_alpha=1,
        init_lora_weights="seed",
        steps=100,
        batch_size=10,
        lr=1e-3,
        schedule="none",
        digit_fraction=1.0,
        augment=False,
        distill=0.0,
        val_size=0,
        name="seed",
        summary="the seed notebook's: digit-D images only, batch 10, 100 steps, r=1 (forgets other digits)",
    )
)
# Ours: digit-D batches mixed with replayed other digits, augmented, distilled toward the base.
register_recipe(AdapterRecipe(name="replay", summary="ours: digit batches with replayed other digits, distilled toward the base"))
# The forgetting study (docs/results.md): replay plus new signal, plus updates kept out of the other digits' way.
# Their values (elastic alpha 8, energy 0.9) are what `mnist-peft forgetting-study` chose on validation.
register_recipe(
    AdapterRecipe(
        distortion="affine", name="replay-affine", summary="replay, the digit's images randomly rotated, scaled and shifted (the control)"
    )
)
register_recipe(
    AdapterRecipe(
        distortion="elastic",
        elastic_alpha=8.0,
        name="elastic",
        summary="replay, the digit's images elastically distorted (Simard et al. 2003; alpha 8 px, sigma 4 px)",
    )
)
register_recipe(
    AdapterRecipe(
        null_space_energy=0.9,
        name="null-space",
        summary="replay, A kept off the directions holding 90% of the other digits' layer inputs (AlphaEdit, GPM, InfLoRA)",
    )
)
register_recipe(
    AdapterRecipe(
        distortion="elastic",
        elastic_alpha=8.0,
        null_space_energy=0.9,
        name="elastic-null-space",
        summary="both: elastic distortions of the digit's images (alpha 8), A kept off 90% of the other digits' input directions",
    )
)


@dataclass
class AdapterTrainResult:
    digit: int
    recipe: str
    steps: int
    seconds: float
    stopped_early: bool
    before: EvalResult
    after: EvalResult
    null_space: dict[str, dict[str, float]] | None = None
    """With ``null_space_energy``: per layer, the directions kept out, the preserved energy left in
    the allowed ones, and the output change on the other digits' test images against its bound."""

    def metrics(self) -> dict[str, object]:
        """What the registry records of a trained adapter."""
        found: dict[str, object] = {
            "accuracy": self.after.accuracy,
            "wrong_per_digit": self.after.wrong_per_digit,
            "accuracy_before": self.before.accuracy,
            "wrong_per_digit_before": self.before.wrong_per_digit,
        }
        if self.null_space is not None:
            found["null_space"] = self.null_space
        return found


def save_trained_adapter(
    model: LoraModel,
    result: AdapterTrainResult,
    folder: str | os.PathLike[str],
    *,
    base_model: str,
    extra: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a trained digit adapter as ``train-adapter`` and ``train-adapters`` do: header metadata
    (digit, recipe, steps, r, lora_alpha, then ``extra``) and the digit's model card."""
    from mnist_peft.io.adapters import save_adapter
    from mnist_peft.io.cards import digit_model_card

    cfg = model.peft_config["default"]
    meta = {
        "digit": str(result.digit),
        "recipe": result.recipe,
        "steps": str(result.steps),
        "r": str(cfg.r),
        "lora_alpha": f"{cfg.lora_alpha:g}",
        **(extra or {}),
    }
    card = digit_model_card(result.digit, result, base_model=base_model, config=cfg)
    return save_adapter(model, folder, metadata=meta, base_model_name_or_path=base_model, dtype=dtype, model_card=card)


def resolve_recipe(recipe: str | AdapterRecipe, overrides: dict[str, object]) -> tuple[str, AdapterRecipe]:
    """``(name, recipe with overrides)`` for a registered adapter recipe's name or an :class:`AdapterRecipe`
    (``None`` overrides are ignored).

    Raises:
        TrainConfigError: no adapter recipe of that name, or an override the recipe refuses.
    """
    if isinstance(recipe, str):
        found = get_recipe("adapter", recipe)
        if not isinstance(found, AdapterRecipe):
            raise TrainConfigError(f"adapter recipe {recipe!r} is a {type(found).__name__}, not an AdapterRecipe")
        recipe = found
    return recipe.name, replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def train_adapter(
    base: nn.Module,
    digit: int,
    recipe: str | AdapterRecipe = "replay",
    *,
    resume: str | os.PathLike[str] | None = None,
    force: bool = False,
    data_dir: str | None = None,
    progress: bool = False,
    **overrides: object,
) -> tuple[LoraModel, AdapterTrainResult]:
    """Train a LoRA adapter (DoRA with ``use_dora=True``) that fixes ``digit`` on top of ``base``
    (which is never modified). Every parameter of the adapter is trained: A, B and, for DoRA, the
    magnitude vector of each layer.

    Args:
        resume: an adapter folder to continue training (incremental update) instead of starting
            a fresh adapter; its rank, alpha and type (LoRA or DoRA) are kept. Refused if it was
            trained on another base, unless ``force``, or if ``use_dora`` asks for the other type.

    Returns:
        The :class:`LoraModel` with adapter ``default`` trained, and before/after test metrics.

    Example:
        >>> model, result = train_adapter(load_base("adapters/base/v1"), 9)
        >>> result.before.wrong_per_digit[9], result.after.wrong_per_digit[9]
    """
    import copy as _copy

    name, recipe = resolve_recipe(recipe, overrides)
    torch.manual_seed(recipe.seed)
    if resume is not None and recipe.null_space_energy:
        raise TrainConfigError(
            "--resume with a null-space recipe would project the resumed A (its B is not zero) before training: "
            "train a fresh adapter with it, or resume with another recipe"
        )
    if resume is not None:
        from mnist_peft.io.adapters import load_adapter, read_adapter

        files = read_adapter(resume)
        check_resume_type(files.config, overrides.get("use_dora"), resume)
        model = LoraModel(_copy.deepcopy(base))
        load_adapter(model, files, force=force)
    else:
        config = recipe.adapter_config()
        check_rank(base, config)  # before the copy, the factors and the data
        model = LoraModel(_copy.deepcopy(base), config)
    params = [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
    return model, _train_on_digit(model, params, base, digit, recipe, name, data_dir=data_dir, progress=progress)


def check_resume_type(config: LoraConfig, use_dora: object, resume: object) -> None:
    """A resumed adapter keeps its type: ``use_dora`` (None: not asked) must name the type ``config`` has.

    Raises:
        TrainConfigError: the other type was asked for.
    """
    if use_dora is not None and bool(use_dora) != config.use_dora:
        asked, has = ("DoRA", "LoRA") if use_dora else ("LoRA", "DoRA")
        raise TrainConfigError(
            f"--resume {str(resume)!r} is a {has} adapter and keeps its type; {asked} was asked for (use_dora={use_dora!r}): "
            f"drop {'--use-dora' if use_dora else 'use_dora=False'} to continue it as {has}, or train a fresh {asked} adapter "
            "without --resume"
        )


def finetune_full(
    base: nn.Module,
    digit: int,
    recipe: str | AdapterRecipe = "replay",
    *,
    data_dir: str | None = None,
    progress: bool = False,
    **overrides: object,
) -> tuple[nn.Module, AdapterTrainResult]:
    """Fine-tune every weight of a copy of ``base`` on ``digit`` with an adapter recipe's data and loss.

    Used to extract LoRA factors from ``W_finetuned - W_base`` by SVD (see ``combine.lora_from_deltas``).
    """
    import copy as _copy

    name, recipe = resolve_recipe(recipe, overrides)
    if recipe.null_space_energy:
        raise TrainConfigError("a full fine-tune has no LoRA A to project: pick a recipe without the null space")
    torch.manual_seed(recipe.seed)
    model = _copy.deepcopy(base)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    return model, _train_on_digit(model, params, base, digit, recipe, f"{name}-full", data_dir=data_dir, progress=progress)


def _train_on_digit(
    model: nn.Module,
    params: list[nn.Parameter],
    base: nn.Module,
    digit: int,
    recipe: AdapterRecipe,
    name: str,
    *,
    data_dir: str | None,
    progress: bool,
) -> AdapterTrainResult:
    """The per-digit recipe: batches, objective, early stopping; before/after test metrics."""
    if not 0 <= digit <= 9:
        raise InvalidArgumentError(f"digit must be 0..9, got {digit!r}")
    start = time.perf_counter()
    test = load_mnist(train=False, data_dir=data_dir)
    before = evaluate(base, test)
    train = load_mnist(train=True, data_dir=data_dir)
    val = None
    if recipe.val_size:
        train, val = split_validation(train, recipe.val_size, seed=recipe.seed)
    task = DigitTask(recipe, digit, train, base.eval(), torch.Generator().manual_seed(recipe.seed))
    space = None
    if recipe.null_space_energy:
        from .nullspace import null_space, preserved_spectra, project_

        space = null_space(preserved_spectra(base, train, digit), recipe.null_space_energy)
        project_(model, space)  # A starts in the allowed directions (B starts at zero: no change yet)
    fitted = fit(
        model,
        train,
        recipe.fit_config(),
        params=params,
        val=val,
        loss_fn=task.loss,
        batches=task.batches,
        val_score=task.val_score,
        after_step=None if space is None else (lambda: project_(model, space)),
        progress=progress,
        desc=f"digit-{digit}",
    )
    after = evaluate(model, test)
    return AdapterTrainResult(
        digit=digit,
        recipe=name,
        steps=fitted.steps,
        seconds=time.perf_counter() - start,
        stopped_early=fitted.stopped_early,
        before=before,
        after=after,
        null_space=None if space is None else _report(model, base, test, digit, space),
    )


def _report(model: nn.Module, base: nn.Module, test: MnistSplit, digit: int, space: object) -> dict[str, dict[str, float]]:
    from .nullspace import null_space_report

    return null_space_report(model, base, test, digit, space)  # type: ignore[arg-type]

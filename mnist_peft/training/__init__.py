"""Training: the loop, recipes (registered by name) and the batched trainer."""

from __future__ import annotations

from .batched import AdapterJob, train_batched
from .loop import EvalResult, TrainConfig, evaluate, fit
from .recipes import ADAPTER_RECIPES, BASE_RECIPES, AdapterRecipe, BaseRecipe, Recipe, register_recipe, train_adapter, train_base

__all__ = [
    "AdapterJob",
    "train_batched",
    "EvalResult",
    "TrainConfig",
    "evaluate",
    "fit",
    "ADAPTER_RECIPES",
    "BASE_RECIPES",
    "AdapterRecipe",
    "BaseRecipe",
    "Recipe",
    "register_recipe",
    "train_adapter",
    "train_base",
]

"""mnist_peft: LoRA adapter management on Hugging Face PEFT conventions, proven on MNIST."""

from __future__ import annotations

__version__ = "0.1.0"

from .adapters import load_adapter, load_stack, read_adapter, save_adapter
from .combine import combine_adapters, resize_adapter
from .data import MnistSplit, digit_subset, ensure_mnist, load_mnist, resolve_data_root, split_validation
from .errors import *  # noqa: F403  (errors.__all__ is part of the public surface)
from .errors import __all__ as _errors_all
from .lora import LoraConfig, LoraModel, get_delta_weight
from .model import MnistMLP, base_fingerprint, count_parameters, load_base
from .recipes import ADAPTER_RECIPES, BASE_RECIPES, AdapterRecipe, BaseRecipe, Recipe, register_recipe, train_adapter, train_base
from .registry import AdapterRegistry
from .serving import hot_swap, mixed_forward
from .train import EvalResult, TrainConfig, evaluate, fit

__all__ = [
    "__version__",
    # data
    "MnistSplit",
    "load_mnist",
    "ensure_mnist",
    "resolve_data_root",
    "digit_subset",
    "split_validation",
    # model
    "MnistMLP",
    "base_fingerprint",
    "count_parameters",
    "load_base",
    # training
    "TrainConfig",
    "BASE_RECIPES",
    "EvalResult",
    "fit",
    "train_base",
    "evaluate",
    "AdapterRecipe",
    "ADAPTER_RECIPES",
    "Recipe",
    "BaseRecipe",
    "register_recipe",
    "train_adapter",
    # LoRA and adapters
    "LoraConfig",
    "LoraModel",
    "get_delta_weight",
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "load_stack",
    "combine_adapters",
    "resize_adapter",
    "AdapterRegistry",
    "mixed_forward",
    "hot_swap",
    *_errors_all,
]

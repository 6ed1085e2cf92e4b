"""mnist_peft: LoRA adapter management on Hugging Face PEFT conventions, proven on MNIST."""

from __future__ import annotations

__version__ = "0.1.0"

from .data import MnistSplit, digit_subset, ensure_mnist, load_mnist, resolve_data_root, split_validation
from .errors import *  # noqa: F403  (errors.__all__ is part of the public surface)
from .errors import __all__ as _errors_all
from .model import MnistMLP, base_fingerprint, count_parameters, load_base
from .train import BASE_RECIPES, EvalResult, TrainConfig, evaluate, fit, train_base

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
    *_errors_all,
]

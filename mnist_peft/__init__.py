"""mnist_peft: LoRA adapter management on Hugging Face PEFT conventions, proven on MNIST."""
# ruff: noqa: F405  (the public names below resolve lazily through __getattr__; ruff cannot see them)

from __future__ import annotations

__version__ = "0.1.0"

from .errors import *  # noqa: F403  (errors.__all__ is part of the public surface; it needs no torch)
from .errors import __all__ as _errors_all

# Everything else is imported on first use (PEP 562), so that ``import mnist_peft`` and commands
# that need no tensors (``mnist-peft registry list``, ``push``) do not pay for importing torch.
_LAZY = {
    "load_adapter": "io",
    "load_stack": "io",
    "read_adapter": "io",
    "save_adapter": "io",
    "combine_adapters": "merging",
    "resize_adapter": "merging",
    "MnistSplit": "model",
    "digit_subset": "model",
    "ensure_mnist": "model",
    "load_mnist": "model",
    "resolve_data_root": "model",
    "split_validation": "model",
    "LoraConfig": "tuners.lora",
    "DoraConfig": "tuners.dora",
    "LoraModel": "tuners.lora",
    "get_delta_weight": "tuners.lora",
    "MnistMLP": "model",
    "base_fingerprint": "model",
    "count_parameters": "model",
    "load_base": "model",
    "ADAPTER_RECIPES": "training",
    "BASE_RECIPES": "training",
    "AdapterRecipe": "training",
    "BaseRecipe": "training",
    "Recipe": "training",
    "register_recipe": "training",
    "train_adapter": "training",
    "train_base": "training",
    "AdapterRegistry": "registry",
    "hot_swap": "serving",
    "mixed_forward": "serving",
    "EvalResult": "training",
    "TrainConfig": "training",
    "evaluate": "training",
    "fit": "training",
    "AdapterJob": "fleet",
    "train_batched": "fleet",
    "run_fleet": "fleet",
}


def __getattr__(name: str) -> object:
    import importlib
    import importlib.util

    module = _LAZY.get(name)
    if module is None:
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a submodule: mnist_peft.model, ...
        raise AttributeError(f"module 'mnist_peft' has no attribute {name!r}")

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
    # fleets
    "AdapterJob",
    "train_batched",
    "run_fleet",
    # LoRA and adapters
    "LoraConfig",
    "DoraConfig",
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

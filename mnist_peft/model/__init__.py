"""The base: the seed's MNIST MLP (``MnistMLP``, Hub-loadable), its fingerprint, and the bundled MNIST data."""

from __future__ import annotations

from .data import MnistSplit, digit_subset, ensure_mnist, load_mnist, resolve_data_root, split_validation
from .mlp import MnistMLP, base_fingerprint, count_parameters, load_base

__all__ = [
    "MnistSplit",
    "digit_subset",
    "ensure_mnist",
    "load_mnist",
    "resolve_data_root",
    "split_validation",
    "MnistMLP",
    "base_fingerprint",
    "count_parameters",
    "load_base",
]

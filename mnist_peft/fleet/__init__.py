"""Fleets of adapters: a run (validate, pin, execute, publish) over an executor (local or Ray).

The names below resolve on first use (PEP 562): the executor table feeds the ``mnist-peft``
parser, which must not import torch for the commands that need no tensors.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "AdapterJob": "mnist_peft.training.batched",
    "train_batched": "mnist_peft.training.batched",
    "run_fleet": ".run",
    "FleetResult": ".run",
    "FleetAdapter": ".executors.base",
    "fleet_jobs": ".jobs",
    "parse_digits": ".jobs",
    "EXECUTORS": ".executors.table",
}

__all__ = [
    "AdapterJob",
    "run_fleet",
    "train_batched",
    "FleetResult",
    "FleetAdapter",
    "fleet_jobs",
    "parse_digits",
    "EXECUTORS",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

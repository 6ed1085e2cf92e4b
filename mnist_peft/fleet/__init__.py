"""Fleets of adapters: a run (validate, pin, execute, publish) over an executor (local or Ray)."""

from __future__ import annotations

from .run import AdapterJob, run_fleet, train_batched

__all__ = [
    "AdapterJob",
    "run_fleet",
    "train_batched",
]

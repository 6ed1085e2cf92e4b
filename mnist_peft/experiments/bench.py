"""Benchmarks that print ratios measured in one run (``mnist-peft bench``): the table of figures
and the run over it.

Each figure times ours, the bare base and/or ``peft`` on the same weights, interleaved round-robin
(so drift in machine load hits all alike), and reports medians over several repetitions. The
figures live by topic in :mod:`.bench_adapters`, :mod:`.bench_dora`, :mod:`.bench_workflows` and
:mod:`.bench_serving`; what they share
(``Figure``, ``time_round_robin``) in :mod:`.bench_measure`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mnist_peft.errors import InvalidArgumentError

from .bench_adapters import (
    bench_adapter_file_size,
    bench_adapter_load,
    bench_combine_ten,
    bench_forward_unmerged,
    bench_hot_swap,
    bench_merge_unmerge,
    bench_mixed_batch,
)
from .bench_dora import bench_forward_dora, bench_mixed_lora_dora
from .bench_measure import Figure, time_round_robin
from .bench_serving import bench_serve_cold_adapter, bench_serve_throughput
from .bench_workflows import bench_registry, bench_train_epoch, bench_train_ten_adapters, bench_ui_throughput

__all__ = ["Figure", "time_round_robin", "run_bench", "FIGURES"]


FIGURES: dict[str, Callable[..., Figure]] = {
    "forward_unmerged": lambda ctx: bench_forward_unmerged(ctx["base"], ctx["x"], reps=ctx["reps"]),
    "merge_unmerge": lambda ctx: bench_merge_unmerge(ctx["base"], reps=ctx["reps"]),
    "mixed_batch": lambda ctx: bench_mixed_batch(ctx["base"], ctx["x"], reps=ctx["reps"]),
    "forward_dora": lambda ctx: bench_forward_dora(ctx["base"], ctx["x"], reps=ctx["reps"]),
    "mixed_lora_dora": lambda ctx: bench_mixed_lora_dora(ctx["base"], ctx["x"], reps=ctx["reps"]),
    "hot_swap": lambda ctx: bench_hot_swap(ctx["base"], reps=ctx["reps"]),
    "adapter_load": lambda ctx: bench_adapter_load(ctx["base"], reps=ctx["reps"]),
    "train_epoch": lambda ctx: bench_train_epoch(ctx["data_dir"], reps=max(1, ctx["reps"] // 2), fraction=ctx["train_fraction"]),
    "adapter_file_size": lambda ctx: bench_adapter_file_size(ctx["base"]),
    "combine_ten": lambda ctx: bench_combine_ten(ctx["base"], reps=ctx["reps"]),
    "registry_add": lambda ctx: bench_registry("add", reps=ctx["reps"], entries=ctx["registry_entries"]),
    "registry_get": lambda ctx: bench_registry("get", reps=ctx["reps"], entries=ctx["registry_entries"]),
    "train_ten_adapters": lambda ctx: bench_train_ten_adapters(ctx["base"], ctx["data_dir"], fraction=ctx["train_fraction"]),
    # 200 requests as the issue asks; a quick run (--reps below 5, e.g. the test's) sends 40
    "ui_throughput": lambda ctx: bench_ui_throughput(
        ctx["base"], ctx["x"], data_dir=ctx["data_dir"], requests=200 if ctx["reps"] >= 5 else 40
    ),
    # mnist-peft serve in a process of its own: reps rounds of half a second a side; reps cold adapters (at least 3)
    "serve_throughput": lambda ctx: bench_serve_throughput(ctx["base"], ctx["x"], data_dir=ctx["data_dir"], reps=ctx["reps"]),
    "serve_cold_adapter": lambda ctx: bench_serve_cold_adapter(ctx["base"], ctx["x"], data_dir=ctx["data_dir"], reps=ctx["reps"]),
}
# figure -> the module of the optional extra it needs
OPTIONAL_FIGURES = {"ui_throughput": "gradio", "serve_throughput": "fastapi", "serve_cold_adapter": "fastapi"}


def _measurable(name: str) -> bool:
    """Whether a full run measures ``name``: not when its optional extra is missing (asked for by
    name with ``--only``, it fails and says what to install)."""
    import importlib.util

    module = OPTIONAL_FIGURES.get(name)
    return module is None or importlib.util.find_spec(module) is not None


def run_bench(
    *,
    base: nn.Module | None = None,
    x: torch.Tensor | None = None,
    images: int | None = None,
    reps: int = 7,
    train_fraction: float = 1.0,
    only: list[str] | None = None,
    data_dir: str | None = None,
    progress: bool = False,
    registry_entries: int = 10_000,
) -> list[Figure]:
    """Measure every figure (or ``only`` those named) in this one run."""
    from mnist_peft.model.data import load_mnist
    from mnist_peft.model.mlp import MnistMLP
    from mnist_peft.progress import Progress

    if base is None:
        torch.manual_seed(0)
        base = MnistMLP()
    base.eval()
    if x is None:
        x = load_mnist(train=False, data_dir=data_dir).x
    if images is not None:
        x = x[:images]
    ctx = {"base": base, "x": x, "reps": reps, "data_dir": data_dir, "train_fraction": train_fraction, "registry_entries": registry_entries}
    names = only or [n for n in FIGURES if _measurable(n)]
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise InvalidArgumentError(f"unknown figure(s) {unknown}; choose from {', '.join(FIGURES)}")
    figures = []
    with Progress(len(names), "bench", enabled=progress, unit="figure") as bar:
        for n in names:
            figures.append(FIGURES[n](ctx))
            bar.update()
    return figures

"""Benchmarks that print ratios measured in one run (``mnist-peft bench``).

Each figure times ours, the bare base and/or ``peft`` on the same weights, interleaved round-robin
(so drift in machine load hits all alike), and reports medians over several repetitions.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .lora import LoraConfig, LoraModel

__all__ = ["Figure", "time_round_robin", "run_bench", "FIGURES"]


@dataclass
class Figure:
    """One measured figure; ``ratio`` is ours/base where a base applies, else ours/peft."""

    name: str
    ours: float
    peft: float | None
    base: float | None
    ratio: float
    target: float
    unit: str
    passed: bool
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["pass"] = d.pop("passed")
        return d


def time_round_robin(fns: dict[str, Callable[[], object]], *, reps: int = 7, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def _figure(name: str, *, ours: float, target: float, unit: str, base: float | None = None, peft: float | None = None, note: str = "") -> Figure:
    """A figure with a base: ratio = ours/base against ``target``, and faster than peft if measured."""
    assert base is not None
    ratio = ours / base
    passed = ratio <= target and (peft is None or ours < peft)
    return Figure(name=name, ours=ours, peft=peft, base=base, ratio=ratio, target=target, unit=unit, passed=passed, note=note)


def _models(base: nn.Module, r: int = 4, n_adapters: int = 1, seed: int = 0):
    """Native and peft models on the same base with the same non-trivial adapter weights."""
    import peft

    from .peft_compat import to_peft_config

    names = ["default"] + [f"a{i}" for i in range(1, n_adapters)]
    cfg = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False)
    torch.manual_seed(seed)
    ours = LoraModel(copy.deepcopy(base), cfg).eval()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), to_peft_config(cfg)).eval()
    for name in names[1:]:
        torch.manual_seed(seed + len(name))
        ours.add_adapter(name, cfg)
        torch.manual_seed(seed + len(name))
        theirs.add_adapter(name, to_peft_config(cfg))
    for m in (ours, theirs):
        for p in m.parameters():
            p.requires_grad_(False)
    return ours, theirs, names


def bench_forward_unmerged(base: nn.Module, x: torch.Tensor, *, reps: int) -> Figure:
    ours, theirs, _ = _models(base)
    with torch.inference_mode():
        t = time_round_robin({"base": lambda: base(x), "ours": lambda: ours(x), "peft": lambda: theirs(x)}, reps=reps)
    return _figure("forward_unmerged", ours=t["ours"], base=t["base"], peft=t["peft"], target=1.10, unit="s",
                   note=f"batch {x.shape[0]}, r=4 on linear1..3, eval; peft/base = {t['peft'] / t['base']:.3f}")  # fmt: skip


def bench_merge_unmerge(base: nn.Module, *, reps: int) -> Figure:
    ours, theirs, _ = _models(base)

    def ours_cycle() -> None:
        ours.merge()
        ours.unmerge()

    def peft_cycle() -> None:
        theirs.merge_adapter()
        theirs.unmerge_adapter()

    with torch.no_grad():
        t = time_round_robin({"ours": ours_cycle, "peft": peft_cycle}, reps=reps * 5, warmup=3)
    ms = {k: v * 1e3 for k, v in t.items()}
    return Figure("merge_unmerge", ours=ms["ours"], peft=ms["peft"], base=None, ratio=ms["ours"] / ms["peft"], target=2.5, unit="ms",
                  passed=ms["ours"] <= 2.5 and ms["ours"] < ms["peft"],
                  note="one merge + one unmerge of an r=4 adapter on linear1..3; ratio = ours/peft, target in ms")  # fmt: skip


FIGURES: dict[str, Callable[..., Figure]] = {
    "forward_unmerged": lambda ctx: bench_forward_unmerged(ctx["base"], ctx["x"], reps=ctx["reps"]),
    "merge_unmerge": lambda ctx: bench_merge_unmerge(ctx["base"], reps=ctx["reps"]),
}


def run_bench(
    *,
    base: nn.Module | None = None,
    x: torch.Tensor | None = None,
    reps: int = 7,
    only: list[str] | None = None,
    data_dir: str | None = None,
    progress: bool = False,
) -> list[Figure]:
    """Measure every figure (or ``only`` those named) in this one run."""
    from tqdm.auto import tqdm

    from .data import load_mnist
    from .model import MnistMLP

    if base is None:
        torch.manual_seed(0)
        base = MnistMLP()
    base.eval()
    if x is None:
        x = load_mnist(train=False, data_dir=data_dir).x
    ctx = {"base": base, "x": x, "reps": reps, "data_dir": data_dir}
    names = only or list(FIGURES)
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; choose from {', '.join(FIGURES)}")
    return [FIGURES[n](ctx) for n in tqdm(names, desc="bench", disable=not progress, leave=False)]

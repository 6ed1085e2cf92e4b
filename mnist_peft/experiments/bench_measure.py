"""What every benchmark figure shares: the ``Figure`` record, round-robin timing, and the helpers
that build a figure against a base or a floor, or a native/peft model pair on the same weights.

Each figure times ours, the bare base and/or ``peft`` on the same weights, interleaved round-robin
(so drift in machine load hits all alike), and reports medians over several repetitions.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mnist_peft.errors import InvalidArgumentError
from mnist_peft.tuners.dora.config import DoraConfig
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel
from mnist_peft.tuners.lora.targets import lora_layers

__all__ = ["Figure", "time_round_robin", "ratio_figure", "paired_models", "floor_figure", "against_floor", "merge_floor"]


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


def time_round_robin(
    fns: dict[str, Callable[[], object]], *, reps: int = 7, warmup: int = 1, after: dict[str, Callable[[], object]] | None = None
) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin; ``after[k]``, if
    given, runs after each call of ``fns[k]`` with the clock stopped (e.g. to undo a load)."""
    after = after or {}
    for _ in range(warmup):
        for k, fn in fns.items():
            fn()
            if k in after:
                after[k]()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
            if k in after:
                after[k]()
    return {k: statistics.median(v) for k, v in samples.items()}


def ratio_figure(
    name: str, *, ours: float, target: float, unit: str, base: float | None = None, peft: float | None = None, note: str = ""
) -> Figure:
    """A figure with a base: ratio = ours/base against ``target``, and faster than peft if measured."""
    assert base is not None
    ratio = ours / base
    passed = ratio <= target and (peft is None or ours < peft)
    return Figure(name=name, ours=ours, peft=peft, base=base, ratio=ratio, target=target, unit=unit, passed=passed, note=note)


def paired_models(base: nn.Module, r: int = 4, n_adapters: int = 1, seed: int = 0, *, dora: bool | Sequence[bool] = False):
    """Native and peft models on the same base with the same non-trivial, distinct adapter weights.
    ``dora``: whether the adapters are DoRA (peft's ``use_dora=True``), for all or per adapter."""
    import peft

    from mnist_peft.io.peft_compat import to_peft_config

    names = ["default"] + [f"a{i}" for i in range(1, n_adapters)]
    kinds = [dora] * n_adapters if isinstance(dora, bool) else list(dora)
    if len(kinds) != n_adapters:
        raise InvalidArgumentError(f"dora names {len(kinds)} adapters, but there are {n_adapters}; give one flag per adapter")
    cfgs = [(DoraConfig if d else LoraConfig)(r=r, lora_alpha=2 * r, init_lora_weights=False) for d in kinds]
    torch.manual_seed(seed)
    ours = LoraModel(copy.deepcopy(base), cfgs[0]).eval()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), to_peft_config(cfgs[0])).eval()
    for i, name in enumerate(names[1:], start=1):
        torch.manual_seed(seed + 1000 * i)  # a seed per adapter: ten distinct adapters
        ours.add_adapter(name, cfgs[i])
        torch.manual_seed(seed + 1000 * i)
        theirs.add_adapter(name, to_peft_config(cfgs[i]))
    for m in (ours, theirs):
        for p in m.parameters():
            p.requires_grad_(False)
    return ours, theirs, names


def floor_figure(name: str, t: dict[str, float], *, target: float, note: str) -> Figure:
    """ours / floor (measured in the same run) against ``target``; ms and peft's ms beside it."""
    ms = {k: v * 1e3 for k, v in t.items()}
    ratio = ms["ours"] / ms["floor"]
    return Figure(
        name,
        ours=ms["ours"],
        peft=ms.get("peft"),
        base=ms["floor"],
        ratio=ratio,
        target=target,
        unit="ms",
        passed=ratio <= target,
        note=note + f"; ratio = ours / floor; peft {ms['peft'] / ms['floor']:.2f}x floor",
    )


def against_floor(
    ours: Callable[[], object],
    floor: Callable[[], object],
    peft: Callable[[], object],
    *,
    reps: int,
    warmup: int,
    after: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Ours and its floor interleaved in one round-robin; peft timed in a round of its own.

    peft's merge allocates and frees tens of MB per call, which evicts the caches and slowed
    whatever ran next by ~40% when all three were interleaved (measured: ours/floor 1.8x alone,
    2.5x beside peft). The ratio compares ours with its floor under the same conditions.
    """
    t = time_round_robin({"ours": ours, "floor": floor}, reps=reps, warmup=warmup, after=after)
    t.update(time_round_robin({"peft": peft}, reps=reps, warmup=warmup, after=after))
    return t


def merge_floor(model: LoraModel, adapter: str):
    """The least a merge can cost: one in-place ``addmm_`` of the same delta into each weight."""
    ops = []
    for _, layer in lora_layers(model.model):
        if adapter in layer.lora_A:
            w = layer.base_layer.weight.detach().clone()
            ops.append(
                (w, layer.lora_B[adapter].detach().contiguous(), layer.lora_A[adapter].detach().contiguous(), layer.scaling[adapter])
            )

    def floor() -> None:
        for w, B, A, s in ops:
            w.addmm_(B, A, alpha=s)

    return floor

"""Benchmark figures of DoRA adapters (peft's ``LoraConfig(use_dora=True)``), measured as the LoRA
figures are (:mod:`.bench_adapters`): the inference forward against the bare base and peft
(``forward_dora``), and a mixed batch of LoRA and DoRA adapters and the base (``mixed_lora_dora``).
"""

from __future__ import annotations

import torch
from torch import nn

from mnist_peft.tuners.lora.targets import lora_layers

from .bench_measure import Figure, paired_models, ratio_figure, time_round_robin

__all__ = ["bench_forward_dora", "bench_mixed_lora_dora"]


def _bound(expected: torch.Tensor, model: nn.Module) -> float:
    """:func:`~mnist_peft.io.peft_compat.fast_path_bound` of outputs ``expected`` for ``model``'s adapted
    layers (n: the most inputs a row of one has, the length of DoRA's row norm)."""
    from mnist_peft.io.peft_compat import fast_path_bound

    return fast_path_bound(expected, max(layer.in_features for _, layer in lora_layers(model)))


def bench_forward_dora(base: nn.Module, x: torch.Tensor, *, reps: int) -> Figure:
    """Inference forward with one r=4 DoRA adapter on linear1..3: ours (its fast inference path) and
    peft (its DoRA layer: ``B(A(I))``, the row norm and the rescaled update on every call), each over
    the bare base on the same batch, as ``forward_unmerged``."""
    ours, theirs, _ = paired_models(base, dora=True)
    with torch.inference_mode():
        t = time_round_robin({"base": lambda: base(x), "ours": lambda: ours(x), "peft": lambda: theirs(x)}, reps=reps)
        y_ours, y_peft = ours(x), theirs(x)
    diff, bound = float((y_ours - y_peft).abs().max()), _bound(y_peft, ours)
    return ratio_figure(
        "forward_dora",
        ours=t["ours"],
        base=t["base"],
        peft=t["peft"],
        target=1.10,
        unit="s",
        note=f"batch {x.shape[0]}, DoRA r=4 on linear1..3, eval; peft/base = {t['peft'] / t['base']:.3f}; "
        f"max |ours - peft| {diff:.2g} (fast-path bound {bound:.2g})",
    )


def bench_mixed_lora_dora(base: nn.Module, x: torch.Tensor, *, reps: int) -> Figure:
    """A mixed batch over ten r=4 adapters, LoRA and DoRA in turn, and the bare base (one image in 11),
    through :func:`~mnist_peft.serving.forward.mixed_forward`, over the bare base's forward of the same
    batch, as ``mixed_batch``. peft refuses ``adapter_names=`` when an adapter is DoRA ("Cannot pass
    `adapter_names` when DoRA is enabled."), so its figure is its best path: one forward per adapter's
    rows (``set_adapter``; the base rows in ``disable_adapter()``), rows grouped before timing."""
    from mnist_peft.serving.forward import mixed_forward

    ours, theirs, names = paired_models(base, n_adapters=10, dora=[i % 2 == 1 for i in range(10)])
    slots: list[str | None] = [*names, None]
    per_sample = [slots[i % len(slots)] for i in range(x.shape[0])]
    groups = {n: torch.tensor([i for i, m in enumerate(per_sample) if m == n]) for n in slots}
    groups = {n: rows for n, rows in groups.items() if rows.numel()}

    def peft_grouped() -> torch.Tensor:
        parts = []
        for name, rows in groups.items():
            if name is None:
                with theirs.disable_adapter():
                    parts.append(theirs(x[rows]))
            else:
                theirs.set_adapter(name)
                parts.append(theirs(x[rows]))
        y = torch.cat(parts)
        return torch.empty_like(y).index_copy_(0, torch.cat(list(groups.values())), y)

    with torch.inference_mode():
        t = time_round_robin({"base": lambda: base(x), "ours": lambda: mixed_forward(ours, x, per_sample), "peft": peft_grouped}, reps=reps)
        y_ours, y_peft = mixed_forward(ours, x, per_sample), peft_grouped()
    diff, bound = float((y_ours - y_peft).abs().max()), _bound(y_peft, ours)
    return ratio_figure(
        "mixed_lora_dora",
        ours=t["ours"],
        base=t["base"],
        peft=t["peft"],
        target=1.15,
        unit="s",
        note=f"{x.shape[0]} images over 5 LoRA and 5 DoRA r=4 adapters and the base (one image in 11); "
        f"peft (one forward per adapter, its adapter_names= refuses DoRA): {t['peft'] / t['base']:.3f}x base; "
        f"max |ours - peft| {diff:.2g} (fast-path bound {bound:.2g})",
    )

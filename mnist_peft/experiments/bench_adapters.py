"""Benchmark figures of the adapter operations themselves, against the bare base or a floor and
against ``peft`` on the same weights: forward, merge/unmerge, mixed batch, hot swap, load, file
size, and a ten-adapter TIES merge.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel

from .bench_measure import Figure, against_floor, floor_figure, merge_floor, paired_models, ratio_figure, time_round_robin

__all__ = [
    "bench_forward_unmerged",
    "bench_merge_unmerge",
    "bench_mixed_batch",
    "bench_hot_swap",
    "bench_adapter_load",
    "bench_adapter_file_size",
    "bench_combine_ten",
]


def bench_forward_unmerged(base: nn.Module, x: torch.Tensor, *, reps: int) -> Figure:
    ours, theirs, _ = paired_models(base)
    with torch.inference_mode():
        t = time_round_robin({"base": lambda: base(x), "ours": lambda: ours(x), "peft": lambda: theirs(x)}, reps=reps)
    return ratio_figure(
        "forward_unmerged",
        ours=t["ours"],
        base=t["base"],
        peft=t["peft"],
        target=1.05,
        unit="s",
        note=f"batch {x.shape[0]}, r=4 on linear1..3, eval; peft/base = {t['peft'] / t['base']:.3f}",
    )


def bench_merge_unmerge(base: nn.Module, *, reps: int) -> Figure:
    ours, theirs, _ = paired_models(base)

    def ours_cycle() -> None:
        ours.merge()
        ours.unmerge()

    def peft_cycle() -> None:
        theirs.merge_adapter()
        theirs.unmerge_adapter()

    with torch.no_grad():
        t = against_floor(ours_cycle, merge_floor(ours, "default"), peft_cycle, reps=reps * 5, warmup=3)
    return floor_figure(
        "merge_unmerge",
        t,
        target=2.0,
        note="one merge + one unmerge (bit-exact, with the check for edits made while merged) of an r=4 adapter "
        "on linear1..3; floor = an in-place addmm_ of the same deltas",
    )


def bench_mixed_batch(base: nn.Module, x: torch.Tensor, *, reps: int) -> Figure:
    from mnist_peft.serving.forward import mixed_forward

    ours, theirs, names = paired_models(base, n_adapters=10)
    per_sample = [names[i % len(names)] for i in range(x.shape[0])]
    with torch.inference_mode():
        t = time_round_robin(
            {
                "base": lambda: base(x),
                "ours": lambda: mixed_forward(ours, x, per_sample),
                "peft": lambda: theirs(x, adapter_names=per_sample),
            },
            reps=reps,
        )
        # Agreement with one sample at a time (peft's forward with that sample's adapter active),
        # next to the bare base's own batch-of-N vs batch-of-1 difference (float32 sums reordered).
        n = min(200, x.shape[0])
        mixed_ours, mixed_peft, batched_base = mixed_forward(ours, x, per_sample)[:n], theirs(x, adapter_names=per_sample)[:n], base(x)[:n]
        alone, base_alone = [], []
        for i in range(n):
            theirs.set_adapter(per_sample[i])
            alone.append(theirs(x[i : i + 1]))
            base_alone.append(base(x[i : i + 1]))
        ref, base_ref = torch.cat(alone), torch.cat(base_alone)
    diffs = {
        "ours": float((mixed_ours - ref).abs().max()),
        "peft": float((mixed_peft - ref).abs().max()),
        "base": float((batched_base - base_ref).abs().max()),
    }
    return ratio_figure(
        "mixed_batch",
        ours=t["ours"],
        base=t["base"],
        peft=t["peft"],
        target=1.10,
        unit="s",
        note=f"{x.shape[0]} images over 10 distinct r=4 adapters; peft adapter_names= path: {t['peft'] / t['base']:.3f}x base; "
        f"max |batch - one sample alone| over {n} images (largest logit {float(ref.abs().max()):.1f}): ours {diffs['ours']:.2g}, "
        f"peft {diffs['peft']:.2g}, bare base {diffs['base']:.2g}",
    )


def bench_hot_swap(base: nn.Module, *, reps: int) -> Figure:
    """Ours: replace the merged adapter by another loaded one. peft's best path:
    ``hotswap_adapter_from_state_dict`` (swaps the weights of its unmerged adapter in place)."""
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    from mnist_peft.io.peft_compat import native_to_peft_state_dict
    from mnist_peft.serving.forward import hot_swap

    ours, theirs, names = paired_models(base, n_adapters=2)
    a, b = names
    state = {"ours": a, "peft": a}
    ours.set_adapter(a)
    ours.merge()
    sd = {n: {k: v.clone() for k, v in native_to_peft_state_dict(ours.lora_state_dict(n), "default").items()} for n in names}

    def ours_swap() -> None:
        state["ours"] = b if state["ours"] == a else a
        hot_swap(ours, state["ours"])

    def peft_swap() -> None:
        state["peft"] = b if state["peft"] == a else a
        hotswap_adapter_from_state_dict(theirs, sd[state["peft"]], "default", theirs.peft_config["default"])

    with torch.no_grad():
        t = against_floor(ours_swap, merge_floor(ours, a), peft_swap, reps=reps * 5, warmup=2)
    return floor_figure(
        "hot_swap",
        t,
        target=2.5,
        note="replace the merged r=4 adapter with another loaded one (restore the base bit-exactly, merge the other); "
        "floor = an in-place addmm_ merge; peft = hotswap_adapter_from_state_dict (unmerged)",
    )


def bench_adapter_load(base: nn.Module, *, reps: int) -> Figure:
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    from mnist_peft.io.adapters import ADAPTER_WEIGHTS_NAME, clear_parsed_configs, load_adapter, save_adapter

    ours, theirs, _ = paired_models(base)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "digit-x"
        save_adapter(ours, folder)
        target = LoraModel(copy.deepcopy(base))
        fingerprint = target.base_fingerprint()  # once per base, as a server that never edits its base does

        def ours_load() -> None:
            load_adapter(target, folder, "x", base_fingerprint=fingerprint)

        def peft_load() -> None:
            theirs.load_adapter(str(folder), adapter_name="x", low_cpu_mem_usage=True)

        t = against_floor(
            ours_load,
            lambda: load_file(folder / ADAPTER_WEIGHTS_NAME),
            peft_load,
            reps=reps * 5,
            warmup=2,
            after={"ours": lambda: target.delete_adapter("x"), "peft": lambda: theirs.delete_adapter("x")},  # not timed
        )

        def forget() -> None:  # not timed: the next load parses its config again
            target.delete_adapter("x")
            clear_parsed_configs()

        first = time_round_robin({"first": ours_load}, reps=reps * 5, warmup=2, after={"first": forget})["first"]
    return floor_figure(
        "adapter_load",
        t,
        target=1.5,
        note="read + check + load one r=4 adapter folder into a model (deleting it again is not timed; its config, "
        f"parsed once per distinct content, is parsed on the first load only; a load that parses it: {first / t['floor']:.2f}x floor); "
        "floor = safetensors.torch.load_file of the same file; peft with low_cpu_mem_usage=True",
    )


def bench_adapter_file_size(base: nn.Module) -> Figure:
    import tempfile
    from pathlib import Path

    from mnist_peft.io.adapters import ADAPTER_WEIGHTS_NAME, save_adapter

    torch.manual_seed(0)
    model = LoraModel(copy.deepcopy(base), LoraConfig(r=1, lora_alpha=1, init_lora_weights="seed"))
    raw = sum(t.numel() * t.element_size() for t in model.lora_state_dict().values())
    meta = {"digit": "9", "recipe": "seed", "steps": "100", "r": "1", "lora_alpha": "1"}  # what train-adapter writes
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "a", metadata=meta)
        size = (Path(tmp) / "a" / ADAPTER_WEIGHTS_NAME).stat().st_size
    return Figure(
        "adapter_file_size",
        ours=float(size),
        peft=None,
        base=float(raw),
        ratio=size / raw,
        target=1.05,
        unit="bytes",
        passed=size / raw <= 1.05,
        note=f"r=1 adapter on linear1..3: {raw:,} raw tensor bytes, header {size - raw:,} bytes",
    )


def bench_combine_ten(base: nn.Module, *, reps: int) -> Figure:
    """TIES-merge ten r=4 adapters into one r=4 adapter: ours (``combine_adapters``) vs peft's
    ``add_weighted_adapter(combination_type="ties_svd")`` on the same adapters, as a ratio."""
    from mnist_peft.io.adapters import AdapterFiles
    from mnist_peft.merging.combine import combine_adapters

    ours, theirs, names = paired_models(base, n_adapters=10)
    files = [AdapterFiles(config=ours.peft_config[n], state_dict=ours.lora_state_dict(n), metadata={}) for n in names]
    weights = [1.0] * len(names)
    made = {"n": 0}

    def peft_merge() -> None:
        name = f"merged{made['n']}"
        made["n"] += 1
        theirs.add_weighted_adapter(names, weights, name, combination_type="ties_svd", density=0.3, svd_rank=4)
        theirs.delete_adapter(name)

    t = time_round_robin(
        {"ours": lambda: combine_adapters(files, weights, method="ties", density=0.3, r=4), "peft": peft_merge},
        reps=max(1, reps // 2),
    )
    return ratio_figure(
        "combine_ten",
        ours=t["ours"],
        base=t["peft"],
        peft=t["peft"],
        target=1.0,
        unit="s",
        note="TIES (density 0.3) of ten r=4 adapters on linear1..3 into one r=4 adapter; base = peft's ties_svd",
    )

"""Commands that make one adapter or model out of others: ``train-adapter``, ``merge`` (into the base)
and ``combine`` (adapters into one, by any method in the merge table)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from .common import (
    LazyChoices,
    add_common,
    add_model_args,
    add_overrides,
    add_recipe,
    add_root,
    emit,
    fmt_ints,
    model_from_args,
    open_registry,
    out_folder,
    register_output,
    registry_path,
    resolve_adapter,
    resolve_base,
    show_progress,
)
from .table import command

if TYPE_CHECKING:
    import torch

    from mnist_peft.training.loop import EvalResult
    from mnist_peft.training.recipes import AdapterTrainResult
    from mnist_peft.tuners.lora.model import LoraModel

__all__ = ["cmd_train_adapter", "cmd_merge", "cmd_combine"]


def _train_adapter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="DIR", help="base model folder, registry name, or Hub repo id")
    p.add_argument("--digit", required=True, type=int, choices=range(10), metavar="D", help="the digit 0..9 to fix")
    p.add_argument("--out", metavar="DIR", help="folder to save the adapter in")
    p.add_argument("--register", metavar="NAME", help="also add the adapter to the registry as the next version of NAME")
    add_root(p)
    add_recipe(p, "adapter", default="replay")
    p.add_argument("--r", type=int, help="LoRA rank (recipe default: seed 1, replay 4)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument(
        "--use-dora",
        action="store_true",
        default=None,
        help="train a DoRA adapter (peft's use_dora: LoRA plus a trained magnitude vector per layer) instead of a LoRA one; "
        "a --resume adapter keeps its own type",
    )
    p.add_argument("--steps", type=int, help="override the recipe's number of optimiser steps")
    add_overrides(p)
    p.add_argument(
        "--resume",
        metavar="PATH",
        help="continue training this adapter folder or registry entry (incremental update) instead of a fresh one; "
        "a registry entry with no --out/--register is registered as its next version",
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="storage dtype of the saved tensors")
    p.add_argument("--force", action="store_true", help="overwrite --out; accept a --resume adapter from another base")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common(p)


def _save_trained_adapter(args: argparse.Namespace, model, result, out: Path) -> dict | None:
    """Write the adapter (metadata, card, --dtype) to ``out`` and register it if asked."""
    import torch

    from mnist_peft.training.recipes import save_trained_adapter

    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    extra = {"resumed_from": str(args.resume)} if args.resume else None
    save_trained_adapter(model, result, out, base_model=str(args.base), extra=extra, dtype=dtype)
    return register_output(args, out, result.metrics(), digit=args.digit)


@command(
    "train-adapter",
    help="train a per-digit LoRA (or DoRA) adapter and save it in PEFT layout",
    description="Train a LoRA adapter (a DoRA one with --use-dora) that fixes one digit on top of a base model, evaluate before/after on the "
    "test set, and save it as adapter_config.json + adapter_model.safetensors + README.md. Recipe 'seed' is the "
    "seed notebook's (digit images only: fixes the digit, forgets the others); 'replay' (default) mixes the digit's images with replayed other "
    "digits, distilled toward the base.",
    arguments=_train_adapter_arguments,
)
def cmd_train_adapter(args: argparse.Namespace) -> int:
    from mnist_peft.training.recipes import train_adapter

    resumed_ref = _resumed_ref(args)
    if resumed_ref and not args.out and not args.register:
        args.register = resumed_ref.partition("@")[0]  # continue a registry entry: register its next version
    out, _tmp = out_folder(args)
    resume = resolve_adapter(args.resume, args) if args.resume else None
    if resume is not None and args.use_dora is not None:  # before the base is read and the resumed adapter scored
        from mnist_peft.io.adapters import read_adapter
        from mnist_peft.training.recipes import check_resume_type

        check_resume_type(read_adapter(resume).config, args.use_dora, args.resume)
    base = resolve_base(args.base, args)
    resumed = _evaluate_adapter(base, resume, args) if resume is not None else None
    model, result = train_adapter(
        base,
        args.digit,
        args.recipe,
        resume=resume,
        force=args.force,
        data_dir=args.data_dir,
        progress=show_progress(args),
        r=args.r,
        lora_alpha=args.lora_alpha,
        use_dora=args.use_dora,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    cfg = model.peft_config["default"]
    registered = _save_trained_adapter(args, model, result, out)
    d = args.digit
    payload = {
        "digit": d,
        "recipe": result.recipe,
        "out": str(out),
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "adapter_type": cfg.adapter_type,
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_parameters": model.num_lora_parameters(),
        "before": result.before.to_dict(),
        "after": result.after.to_dict(),
        "registered": registered,
    }
    if resumed is not None:
        payload["resumed_from"] = {"ref": resumed_ref or str(args.resume), **resumed.to_dict()}
    where = f"{registered['name']}@{registered['version']}" if registered else str(out)
    text = _train_adapter_text(result, model, resumed_ref or str(args.resume), resumed)
    emit(args, payload, f"{text}\nsaved to {where} (next: mnist-peft eval --base {args.base} --adapter {where})")
    return 0


def _train_adapter_text(result: AdapterTrainResult, model: LoraModel, resumed_from: str, resumed: EvalResult | None) -> str:
    """What ``train-adapter`` says it did: the change against the base, or, for a resumed run,
    against the adapter it resumed from (evaluated: ``resumed``), then against the base too."""
    d, cfg, after = result.digit, model.peft_config["default"], result.after
    kind = "DoRA" if cfg.use_dora else "LoRA"
    lines = [
        f"digit-{d} {kind} adapter ({result.recipe} recipe, r={cfg.r}, {model.num_lora_parameters():,} {kind} parameters): "
        f"{result.steps} steps in {result.seconds:.1f} s"
    ]
    before = result.before
    if resumed is not None:  # what this run changed is measured against the adapter it continued, not the base
        lines.append(f"compared with the adapter it resumed from, {resumed_from}:")
        before = resumed
    lines += [
        f"digit {d} wrong: {before.wrong_per_digit[d]} -> {after.wrong_per_digit[d]}; accuracy {before.accuracy:.4f} -> {after.accuracy:.4f}",
        f"wrong per digit before: {fmt_ints(before.wrong_per_digit)}",
        f"wrong per digit after:  {fmt_ints(after.wrong_per_digit)}",
    ]
    if resumed is not None:
        base = result.before
        lines.append(
            f"against the base: digit {d} wrong {base.wrong_per_digit[d]} -> {after.wrong_per_digit[d]}; "
            f"accuracy {base.accuracy:.4f} -> {after.accuracy:.4f}"
        )
    return "\n".join(lines)


def _resumed_ref(args: argparse.Namespace) -> str | None:
    """``name@version`` of the registry entry ``--resume`` names; None without --resume or for a folder."""
    if not args.resume or registry_path(args.resume, args, "lora") is None:
        return None
    return open_registry(args).get(args.resume).ref


def _evaluate_adapter(base: torch.nn.Module, folder: Path, args: argparse.Namespace) -> EvalResult:
    """The test metrics of the adapter at ``folder`` on (a copy of) ``base``, as ``eval --adapter``
    gives them: where a resumed run starts."""
    import copy

    from mnist_peft.io.adapters import load_stack
    from mnist_peft.training.loop import evaluate

    return evaluate(load_stack(copy.deepcopy(base), [folder], force=args.force), data_dir=args.data_dir)


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, adapter_required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to save the merged model in")
    add_common(p, data=False)


@command(
    "merge",
    help="merge adapters into the base and save a plain model",
    description="Merge one or more adapters (weighted) into the base weights and save the result as a plain "
    "MnistMLP folder that needs no adapter code to load.",
    arguments=_merge_arguments,
)
def cmd_merge(args: argparse.Namespace) -> int:
    from mnist_peft.model.mlp import MnistMLP, base_fingerprint

    out, _ = out_folder(args)
    model = model_from_args(args)
    plain = model.merge_and_unload(safe_merge=True)
    assert isinstance(plain, MnistMLP)
    plain.save_pretrained(out)
    payload = {"out": str(out), "adapters": args.adapter, "weights": args.weight, "fingerprint": base_fingerprint(plain)}
    emit(args, payload, f"merged {len(args.adapter)} adapter(s) into {out} (next: mnist-peft eval --base {out})")
    return 0


def _combine_methods() -> tuple[str, ...]:
    from mnist_peft.merging.methods import METHODS

    return METHODS


def _number(text: str, kind: type, flag: str) -> float | int:
    """``text`` as a ``kind`` (float or int), or an argparse error naming ``flag`` (no 5000-digit numbers)."""
    try:
        if len(text) > 40:
            raise ValueError
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {'an integer' if kind is int else 'a number'} ({flag})") from None


def _checked(text: str, kind: type, flag: str, check_name: str) -> float | int:
    """Parse ``text`` and run the merging library's own check on it (the same range the API enforces)."""
    import importlib

    value = _number(text, kind, flag)
    check = getattr(importlib.import_module("mnist_peft.merging.methods"), check_name)
    try:
        return check([value])[0] if check_name == "check_weights" else check(value)
    except ValueError as exc:  # AdapterConfigError, InvalidArgumentError
        raise argparse.ArgumentTypeError(str(exc)) from None


def _weight(text: str) -> float:
    """``--weight`` of ``combine``: finite, within +-MAX_WEIGHT."""
    return _checked(text, float, "--weight", "check_weights")


def _density(text: str) -> float:
    """``--density``: in [MIN_DENSITY, 1]."""
    return _checked(text, float, "--density", "check_density")


def _seed(text: str) -> int:
    """``--seed``: what a torch.Generator takes, 0 .. 2**64-1."""
    return int(_checked(text, int, "--seed", "check_seed"))


def _rank(text: str) -> int:
    """``--r``: a positive integer (its upper bound depends on the adapters: checked before the work)."""
    value = int(_number(text, int, "--r"))
    if value < 1:
        raise argparse.ArgumentTypeError(f"--r must be >= 1, got {value}")
    return value


def _combine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", action="append", required=True, metavar="PATH", help="adapter folder or registry name; repeat for several")
    add_root(p)
    p.add_argument(
        "--weight", action="append", type=_weight, metavar="W", help="weight of each --adapter, in order (default 1; within +-10000)"
    )
    p.add_argument(
        "--method",
        choices=LazyChoices(_combine_methods),  # type: ignore[arg-type]
        default="cat",
        metavar="METHOD",
        help="cat (exact), svd (the weighted sum truncated to --r), or a task-vector merge truncated to --r: "
        "task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune (peft's names ties_svd, dare_linear_svd, "
        "dare_ties_svd, magnitude_prune_svd are accepted); default cat",
    )
    p.add_argument(
        "--r",
        type=_rank,
        help="target rank (svd and the merges; merges default to the largest input rank); at most the highest rank a layer's "
        "combined update can have",
    )
    p.add_argument("--density", type=_density, help="ties, dare_*, magnitude_prune: the share of each delta's entries kept, in [0.0001, 1]")
    p.add_argument("--majority-sign", choices=["total", "frequency"], default="total", help="TIES sign election (default total)")
    p.add_argument(
        "--ties-mode",
        choices=["peft", "mergekit"],
        default="peft",
        help="peft: elect signs on unweighted deltas, divide by the agreeing count; mergekit: on weighted deltas, "
        "divide by the agreeing weights (default peft)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of DARE's random drops, 0 .. 2**64-1 (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the combined adapter to")
    p.add_argument("--force", action="store_true", help="overwrite --out; combine adapters of different bases")
    add_common(p, data=False)


@command(
    "combine",
    help="combine adapters into one (exact cat, or rank-r SVD); also resizes one adapter",
    description="Combine adapters into one whose delta is the weighted sum of theirs. 'cat' is exact (rank = sum "
    "of ranks); 'svd' keeps the best rank-R approximation per layer and reports its relative Frobenius error. "
    "With a single --adapter and --method svd it resizes that adapter to rank R. LoRA adapters only: a DoRA adapter's "
    "effect is no delta that adds up (each row is rescaled by m/||W + s B A||), so every method refuses it; stack DoRA "
    "adapters with eval --adapter, or merge them into the base with merge.",
    arguments=_combine_arguments,
)
def cmd_combine(args: argparse.Namespace) -> int:
    from mnist_peft.io.adapters import read_adapter, write_adapter
    from mnist_peft.io.cards import render_model_card
    from mnist_peft.merging.combine import combine_adapters

    out, _ = out_folder(args)
    files = [read_adapter(resolve_adapter(a, args)) for a in args.adapter]
    result = combine_adapters(
        files,
        args.weight,
        method=args.method,
        r=args.r,
        force=args.force,
        density=args.density,
        majority_sign=args.majority_sign,
        ties_mode=args.ties_mode,
        seed=args.seed,
    )
    meta = {"combined_from": ",".join(str(a) for a in args.adapter), "method": args.method}
    if args.density is not None:
        meta["density"] = f"{args.density:g}"
    if args.weight:
        meta["weights"] = ",".join(f"{w:g}" for w in args.weight)
    base_model = next((f.metadata.get("base_model") for f in files if f.metadata.get("base_model")), None)
    card = render_model_card(
        base_model=base_model,
        tags=["lora", "mnist", "mnist-peft", f"combine-{args.method}"],
        title=f"combined LoRA adapter ({args.method})",
        body=f"Combined from {', '.join(args.adapter)} with weights {args.weight or [1.0] * len(args.adapter)} by `{args.method}`; "
        f"rank {result.config.r}. Relative Frobenius error per layer: {result.relative_error}.",
    )
    write_adapter(result.to_files(meta), out, model_card=card)
    payload = {"out": str(out), "method": args.method, "r": result.config.r, "relative_error": result.relative_error}
    errs = ", ".join(f"{k} {v:.2e}" for k, v in result.relative_error.items())
    emit(
        args,
        payload,
        f"combined {len(files)} adapter(s) by {args.method} into rank {result.config.r} at {out}\nrelative Frobenius error: {errs}",
    )
    return 0

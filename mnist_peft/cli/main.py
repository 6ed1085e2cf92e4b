"""The ``mnist-peft`` command: a thin table of subcommands over the library.

``main(argv) -> int`` is callable from tests. Library errors become one ``error: ...`` line on
stderr and exit code 1; usage errors exit 2 (argparse); ``train-adapters --allow-partial`` exits 3
when some jobs failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from mnist_peft import __version__
from mnist_peft.errors import MnistPeftError

__all__ = ["main", "build_parser", "COMMANDS", "command"]


def _emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    """One JSON object with ``--json``, else human-readable text."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(text)


def _fmt_ints(values: Sequence[int]) -> str:
    return " ".join(str(v) for v in values)


# ----------------------------------------------------------------------------- the command table
@dataclass(frozen=True)
class Command:
    """One subcommand: its name, help texts, the function that adds its arguments, and its handler."""

    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]
    tensors: bool = True
    """Whether it computes with torch (then denormals are flushed before torch starts its threads);
    the registry and push commands do not, and start without importing torch at all."""


COMMANDS: dict[str, Command] = {}  # in the order ``mnist-peft --help`` lists them


def command(name: str, *, help: str, description: str, arguments: Callable[[argparse.ArgumentParser], None], tensors: bool = True):
    """Register the decorated ``cmd_*`` handler as subcommand ``name``: adding a command is its
    arguments function and its handler, side by side, and nothing else."""

    def register(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise RuntimeError(f"two commands named {name!r}")
        COMMANDS[name] = Command(name, help, description, arguments, handler, tensors)
        return handler

    return register


# ----------------------------------------------------------------------------- commands
def _info_arguments(p: argparse.ArgumentParser) -> None:
    _add_common(p)


@command(
    "info",
    help="describe the model and where data lives",
    description="Describe the MNIST MLP (parameter count, layers), the data root, and the registered base and adapter recipes.",
    arguments=_info_arguments,
)
def cmd_info(args: argparse.Namespace) -> int:
    from mnist_peft.model.data import resolve_data_root
    from mnist_peft.model.mlp import MnistMLP, count_parameters

    model = MnistMLP()
    layers = {n: [m.out_features, m.in_features] for n, m in model.named_children() if hasattr(m, "in_features")}
    payload = {
        "version": __version__,
        "parameters": count_parameters(model),
        "layers": layers,
        "data_root": str(resolve_data_root(args.data_dir)),
    }
    lines = [f"mnist-peft {__version__}", f"parameters: {payload['parameters']:,}"]
    lines += [f"  {n}: weight {o} x {i}" for n, (o, i) in layers.items()]
    lines.append(f"data root: {payload['data_root']}")
    from mnist_peft.training.recipes import get_recipe, recipe_names

    payload["recipes"] = {kind: {n: get_recipe(kind, n).summary for n in recipe_names(kind)} for kind in ("base", "adapter")}
    for kind, recipes in payload["recipes"].items():  # type: ignore[union-attr]
        lines += [f"{kind} recipe {n}: {summary}" for n, summary in recipes.items()]
    _emit(args, payload, "\n".join(lines))
    return 0


def _train_base_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="folder to save the model in")
    p.add_argument("--register", metavar="NAME", help="also add the model to the registry under NAME (e.g. base)")
    _add_root(p)
    _add_recipe(p, "base", default="default")
    p.add_argument("--epochs", type=float, help="override the recipe's number of epochs")
    _add_overrides(p)
    p.add_argument("--val-size", type=int, help="hold out this many training images for early stopping")
    p.add_argument("--patience", type=int, help="epochs without validation gain before stopping")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)


@command(
    "train-base",
    help="train a base MnistMLP and save it",
    description="Train a fresh base model on the MNIST training set, evaluate it on the test set and save it "
    "(config.json + model.safetensors + README.md).",
    arguments=_train_base_arguments,
)
def cmd_train_base(args: argparse.Namespace) -> int:
    from mnist_peft.training.loop import evaluate, progress_enabled
    from mnist_peft.training.recipes import train_base

    out, _tmp = _out_folder(args)
    start = time.perf_counter()
    model, fit = train_base(
        args.recipe,
        data_dir=args.data_dir,
        progress=progress_enabled(args.quiet),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        val_size=args.val_size,
        patience=args.patience,
    )
    train_seconds = time.perf_counter() - start
    result = evaluate(model, data_dir=args.data_dir)
    model.save_pretrained(out)
    from mnist_peft.fileio import atomic_write_text
    from mnist_peft.io.cards import base_model_card
    from mnist_peft.model.mlp import base_fingerprint

    fingerprint = base_fingerprint(model)
    atomic_write_text(out / "README.md", base_model_card(args.recipe, result, fit.steps, fingerprint))

    payload = {
        "recipe": args.recipe,
        "out": str(out),
        "steps": fit.steps,
        "train_seconds": round(train_seconds, 2),
        "stopped_early": fit.stopped_early,
        "fingerprint": fingerprint,
        **result.to_dict(),
    }
    registered = _register(args, out, {"accuracy": result.accuracy, "wrong_per_digit": result.wrong_per_digit})
    payload["registered"] = registered
    where = f"{registered['name']}@{registered['version']}" if registered else str(out)
    text = (
        f"trained {args.recipe} recipe: {fit.steps} steps in {train_seconds:.1f} s\n"
        f"test accuracy {result.accuracy:.4f}; wrong per digit 0..9: {_fmt_ints(result.wrong_per_digit)}\n"
        f"saved to {where} (next: mnist-peft eval --base {where})"
    )
    _emit(args, payload, text)
    return 0


def _registry(args: argparse.Namespace):
    from mnist_peft.registry.adapter_registry import AdapterRegistry

    return AdapterRegistry(getattr(args, "root", None))


def _registry_path(arg: str, args: argparse.Namespace, kind: str) -> Path | None:
    from mnist_peft.registry.refs import registry_folder

    return registry_folder(arg, _registry(args), kind)


def _resolve_base(arg: str, args: argparse.Namespace):
    """``--base``: see :func:`mnist_peft.registry.refs.resolve_base`."""
    from mnist_peft.registry.refs import resolve_base

    return resolve_base(arg, _registry(args))


def _resolve_adapter(arg: str, args: argparse.Namespace) -> Path:
    """``--adapter``: see :func:`mnist_peft.registry.refs.resolve_adapter`."""
    from mnist_peft.registry.refs import resolve_adapter

    return resolve_adapter(arg, _registry(args))


def _register(args: argparse.Namespace, folder: Path, metrics: dict, digit: int | None = None) -> dict | None:
    """``--register NAME``: add the folder just written to the registry as a new version."""
    name = getattr(args, "register", None)
    if not name:
        return None
    entry = _registry(args).add(name, folder, metrics=metrics, digit=digit)
    return {"name": entry.name, "version": entry.version, "root": str(_registry(args).root)}


def _out_folder(args: argparse.Namespace) -> tuple[Path, object]:
    """``--out`` if given (must be empty unless --force); else a temporary folder (with --register)."""
    import tempfile

    if args.out:
        out = Path(args.out)
        if out.exists() and any(out.iterdir()) and not args.force:
            raise _usage_error(f"output folder {str(out)!r} is not empty; pass --force to overwrite it")
        return out, None
    if not getattr(args, "register", None):
        raise _usage_error("give --out DIR, --register NAME, or both")
    tmp = tempfile.TemporaryDirectory(prefix="mnist-peft-")
    return Path(tmp.name) / "out", tmp


def _model_from_args(args: argparse.Namespace):
    """The base, with ``--adapter``/``--weight`` loaded as a stack (and merged with ``--merged``)."""
    from mnist_peft.io.adapters import load_stack

    base = _resolve_base(args.base, args)
    adapters = getattr(args, "adapter", None) or []
    if not adapters:
        if getattr(args, "weight", None):
            raise _usage_error("--weight needs --adapter")
        return base
    model = load_stack(base, [_resolve_adapter(a, args) for a in adapters], args.weight or None, force=args.force)
    if getattr(args, "merged", False):
        model.merge()
    return model


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--merged", action="store_true", help="merge the adapters into the weights before evaluating")
    p.add_argument("--plot", metavar="PNG", help="also write a bar chart of per-digit error rates")
    _add_common(p)


@command(
    "eval",
    help="test accuracy and per-digit errors of a model (optionally with adapters)",
    description="Evaluate a base model, alone or with one or more LoRA adapters stacked on it, on the 10,000 "
    "MNIST test images: accuracy, wrong count and error rate per digit, confusion matrix.",
    arguments=_eval_arguments,
)
def cmd_eval(args: argparse.Namespace) -> int:
    from mnist_peft.experiments.plots import plot_error_rates
    from mnist_peft.training.loop import evaluate

    model = _model_from_args(args)
    result = evaluate(model, data_dir=args.data_dir)
    payload = result.to_dict()
    if args.plot:
        plot_error_rates({"model": result.error_rate_per_digit}, args.plot)
        payload["plot"] = str(args.plot)
    text = (
        f"accuracy {result.accuracy:.4f} on {result.n} test images\n"
        f"wrong per digit 0..9: {_fmt_ints(result.wrong_per_digit)}\n"
        f"error rate per digit: {' '.join(f'{r:.3f}' for r in result.error_rate_per_digit)}"
    )
    _emit(args, payload, text)
    return 0


def _train_adapter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="DIR", help="base model folder, registry name, or Hub repo id")
    p.add_argument("--digit", required=True, type=int, choices=range(10), metavar="D", help="the digit 0..9 to fix")
    p.add_argument("--out", metavar="DIR", help="folder to save the adapter in")
    p.add_argument("--register", metavar="NAME", help="also add the adapter to the registry as the next version of NAME")
    _add_root(p)
    _add_recipe(p, "adapter", default="replay")
    p.add_argument("--r", type=int, help="LoRA rank (recipe default: seed 1, replay 4)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--steps", type=int, help="override the recipe's number of optimiser steps")
    _add_overrides(p)
    p.add_argument(
        "--resume",
        metavar="PATH",
        help="continue training this adapter folder or registry entry (incremental update) instead of a fresh one; "
        "a registry entry with no --out/--register is registered as its next version",
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="storage dtype of the saved tensors")
    p.add_argument("--force", action="store_true", help="overwrite --out; accept a --resume adapter from another base")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)


def _save_trained_adapter(args: argparse.Namespace, model, result, out: Path) -> dict | None:
    """Write the adapter (metadata, card, --dtype) to ``out`` and register it if asked."""
    import torch

    from mnist_peft.training.recipes import save_trained_adapter

    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    extra = {"resumed_from": str(args.resume)} if args.resume else None
    save_trained_adapter(model, result, out, base_model=str(args.base), extra=extra, dtype=dtype)
    return _register(args, out, result.metrics(), digit=args.digit)


@command(
    "train-adapter",
    help="train a per-digit LoRA adapter and save it in PEFT layout",
    description="Train a LoRA adapter that fixes one digit on top of a base model, evaluate before/after on the "
    "test set, and save it as adapter_config.json + adapter_model.safetensors + README.md. Recipe 'seed' is the "
    "seed notebook's (digit images only: fixes the digit, forgets the others); 'replay' (default) mixes the digit's images with replayed other "
    "digits, distilled toward the base.",
    arguments=_train_adapter_arguments,
)
def cmd_train_adapter(args: argparse.Namespace) -> int:
    from mnist_peft.training.loop import progress_enabled
    from mnist_peft.training.recipes import train_adapter

    if args.resume and not args.out and not args.register and _registry_path(args.resume, args, "lora") is not None:
        from mnist_peft.registry.adapter_registry import parse_ref

        args.register = parse_ref(args.resume)[0]  # continue a registry entry: register its next version
    out, _tmp = _out_folder(args)
    base = _resolve_base(args.base, args)
    model, result = train_adapter(
        base,
        args.digit,
        args.recipe,
        resume=_resolve_adapter(args.resume, args) if args.resume else None,
        force=args.force,
        data_dir=args.data_dir,
        progress=progress_enabled(args.quiet),
        r=args.r,
        lora_alpha=args.lora_alpha,
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
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_parameters": model.num_lora_parameters(),
        "before": result.before.to_dict(),
        "after": result.after.to_dict(),
        "registered": registered,
    }
    where = f"{registered['name']}@{registered['version']}" if registered else str(out)
    text = (
        f"digit-{d} adapter ({result.recipe} recipe, r={cfg.r}, {model.num_lora_parameters():,} LoRA parameters): "
        f"{result.steps} steps in {result.seconds:.1f} s\n"
        f"digit {d} wrong: {result.before.wrong_per_digit[d]} -> {result.after.wrong_per_digit[d]}; "
        f"accuracy {result.before.accuracy:.4f} -> {result.after.accuracy:.4f}\n"
        f"wrong per digit before: {_fmt_ints(result.before.wrong_per_digit)}\n"
        f"wrong per digit after:  {_fmt_ints(result.after.wrong_per_digit)}\n"
        f"saved to {where} (next: mnist-peft eval --base {args.base} --adapter {where})"
    )
    _emit(args, payload, text)
    return 0


def _train_adapters_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="REF", help="base model: registry name, folder, or Hub repo id (workers read it too)")
    p.add_argument("--digits", default="0-9", metavar="LIST", help="digits to train adapters for: '0-9', '3', '1,4,7' (default 0-9)")
    p.add_argument("--seeds", default="0", metavar="LIST", help="comma-separated seeds; one adapter per digit and seed (default 0)")
    p.add_argument(
        "--register",
        metavar="PREFIX",
        help="register the fleet in one registry write, as PREFIX-D (PREFIX-D-sS with several seeds); e.g. --register digit",
    )
    p.add_argument("--out", metavar="DIR", help="also write each adapter to DIR/NAME (DIR must be new or empty)")
    p.add_argument("--push", metavar="REPO_ID", help="after registering, push the fleet to this Hub repo in one commit")
    p.add_argument("--executor", choices=["local", "ray"], default="local", help="local: all adapters in one batched loop here "
                   "(default); ray: one Ray task per adapter")  # fmt: skip
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="Ray cluster to join (e.g. 10.0.0.5:6379, or auto); default: $RAY_ADDRESS, else a new local Ray",
    )
    p.add_argument(
        "--retries", type=int, metavar="N", help="Ray re-runs of a job whose worker died or which raised unexpectedly (default 2)"
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="if some jobs fail for good, keep and register the others (exit status 3 says some failed)",
    )
    _add_root(p)
    _add_recipe(p, "adapter", default="replay")
    p.add_argument("--r", type=int, help="LoRA rank (recipe default)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--steps", type=int, help="override the recipe's number of optimiser steps")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size (samples per step)")
    p.add_argument("--lr", type=float, help="override the recipe's (peak) learning rate")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_common(p)


@command(
    "train-adapters",
    help="train a fleet of adapters at once (batched here, or on Ray) and register it in one write",
    description="Train one adapter per digit (and seed) on one base. --executor local trains them together in one batched "
    "loop (one base GEMM per layer for all of them; each adapter equals its solo train-adapter run); --executor ray runs "
    "each as a Ray task (workers read the base from the registry or the Hub; killed workers are retried). The driver "
    "checks every returned adapter, then registers the whole fleet in one registry write (--register) and, if asked, "
    "pushes it in one Hub commit (--push). A job that fails for good fails the fleet and nothing is registered, unless "
    "--allow-partial (then the others are kept and the exit status is 3).",
    arguments=_train_adapters_arguments,
)
def cmd_train_adapters(args: argparse.Namespace) -> int:
    from mnist_peft.fleet.run import fleet_jobs, parse_digits, run_fleet

    if not args.out and not args.register:
        raise _usage_error("give --register PREFIX, --out DIR, or both")
    if args.push and not args.register:
        raise _usage_error("--push needs --register PREFIX (the fleet is pushed from the registry)")
    if args.executor == "local" and (args.ray_address or args.retries is not None):
        raise _usage_error("--ray-address and --retries apply to --executor ray only")
    if args.retries is not None and args.retries < 0:
        raise _usage_error(f"--retries must be >= 0, got {args.retries}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        jobs = fleet_jobs(
            parse_digits(args.digits),
            seeds,
            prefix=args.register or "digit",
            recipe=args.recipe,
            r=args.r,
            lora_alpha=args.lora_alpha,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
        )
    except ValueError as exc:  # --digits, --seeds or --register (recipe values are checked by run_fleet: exit 1)
        message = str(exc) if isinstance(exc, MnistPeftError) else f"--seeds {args.seeds!r}: expected integers, e.g. 0,1,2"
        raise _usage_error(message) from None
    res = run_fleet(
        args.base,
        jobs,
        root=args.root,
        executor=args.executor,
        ray_address=args.ray_address,
        retries=2 if args.retries is None else args.retries,
        out=args.out,
        register=bool(args.register),
        allow_partial=args.allow_partial,
        push_repo=args.push,
        data_dir=args.data_dir,
        quiet=args.quiet,
    )
    payload = {
        "executor": res.executor,
        "seconds": round(res.seconds, 2),
        "trained": [
            {"name": a.name, "digit": a.digit, "seed": a.seed, "steps": a.steps, "folder": a.folder, "metrics": a.metrics}
            for a in res.trained
        ],
        "failed": res.failed,
        "registered": res.registered,
        "pushed": res.pushed,
        "base_revision": res.base_revision,
    }
    lines = [f"trained {len(res.trained)} adapters with the {res.executor} executor in {res.seconds:.1f} s"]
    if res.base_revision:
        lines.append(f"base {args.base} read at commit {res.base_revision[:12]} by the driver and every worker")
    for a in res.trained:
        wrong, before = a.metrics.get("wrong_per_digit"), a.metrics.get("wrong_per_digit_before")
        fix = f"digit {a.digit} wrong {before[a.digit]} -> {wrong[a.digit]}" if isinstance(wrong, list) and isinstance(before, list) else ""
        lines.append(f"  {a.name}: {a.steps} steps; {fix}; accuracy {a.metrics.get('accuracy', float('nan')):.4f}")
    if res.failed:
        lines.append("failed (kept out, --allow-partial): " + "; ".join(f"{n}: {e}" for n, e in res.failed.items()))
    if res.registered:
        lines.append("registered " + ", ".join(f"{e['name']}@{e['version']}" for e in res.registered) + " in one write")
    if res.pushed:
        lines.append(f"pushed to {res.pushed['repo_id']} in one commit ({str(res.pushed['commit'])[:12]})")
    if args.out:
        lines.append(f"written to {args.out}")
    _emit(args, payload, "\n".join(lines))
    return 3 if res.failed else 0


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_args(p, adapter_required=True)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to save the merged model in")
    _add_common(p, data=False)


@command(
    "merge",
    help="merge adapters into the base and save a plain model",
    description="Merge one or more adapters (weighted) into the base weights and save the result as a plain "
    "MnistMLP folder that needs no adapter code to load.",
    arguments=_merge_arguments,
)
def cmd_merge(args: argparse.Namespace) -> int:
    from mnist_peft.model.mlp import MnistMLP, base_fingerprint

    out, _ = _out_folder(args)
    model = _model_from_args(args)
    plain = model.merge_and_unload(safe_merge=True)
    assert isinstance(plain, MnistMLP)
    plain.save_pretrained(out)
    payload = {"out": str(out), "adapters": args.adapter, "weights": args.weight, "fingerprint": base_fingerprint(plain)}
    _emit(args, payload, f"merged {len(args.adapter)} adapter(s) into {out} (next: mnist-peft eval --base {out})")
    return 0


def _combine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", action="append", required=True, metavar="PATH", help="adapter folder or registry name; repeat for several")
    _add_root(p)
    p.add_argument("--weight", action="append", type=float, metavar="W", help="weight of each --adapter, in order (default 1)")
    p.add_argument(
        "--method",
        choices=_LazyChoices(_combine_methods),  # type: ignore[arg-type]
        default="cat",
        metavar="METHOD",
        help="cat (exact), svd (the weighted sum truncated to --r), or a task-vector merge truncated to --r: "
        "task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune (peft's names ties_svd, dare_linear_svd, "
        "dare_ties_svd, magnitude_prune_svd are accepted); default cat",
    )
    p.add_argument("--r", type=int, help="target rank (svd and the merges; merges default to the largest input rank)")
    p.add_argument("--density", type=_fraction, help="ties, dare_*, magnitude_prune: the share of each delta's entries kept")
    p.add_argument("--majority-sign", choices=["total", "frequency"], default="total", help="TIES sign election (default total)")
    p.add_argument(
        "--ties-mode",
        choices=["peft", "mergekit"],
        default="peft",
        help="peft: elect signs on unweighted deltas, divide by the agreeing count; mergekit: on weighted deltas, "
        "divide by the agreeing weights (default peft)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of DARE's random drops (default 0)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the combined adapter to")
    p.add_argument("--force", action="store_true", help="overwrite --out; combine adapters of different bases")
    _add_common(p, data=False)


@command(
    "combine",
    help="combine adapters into one (exact cat, or rank-r SVD); also resizes one adapter",
    description="Combine adapters into one whose delta is the weighted sum of theirs. 'cat' is exact (rank = sum "
    "of ranks); 'svd' keeps the best rank-R approximation per layer and reports its relative Frobenius error. "
    "With a single --adapter and --method svd it resizes that adapter to rank R.",
    arguments=_combine_arguments,
)
def cmd_combine(args: argparse.Namespace) -> int:
    from mnist_peft.io.adapters import read_adapter, write_adapter
    from mnist_peft.io.cards import render_model_card
    from mnist_peft.merging.combine import combine_adapters

    out, _ = _out_folder(args)
    files = [read_adapter(_resolve_adapter(a, args)) for a in args.adapter]
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
    _emit(
        args,
        payload,
        f"combined {len(files)} adapter(s) by {args.method} into rank {result.config.r} at {out}\nrelative Frobenius error: {errs}",
    )
    return 0


def _merge_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="base", metavar="DIR", help="base model folder or registry name (default: base)")
    p.add_argument(
        "--adapter", action="append", metavar="PATH", help="adapter folder or registry name; repeat (default: digit-0 ... digit-9)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for merge-study.json and merge-vs-density.png")
    p.add_argument("--quick", action="store_true", help="a small grid (for a smoke test)")
    _add_root(p)
    _add_common(p)


@command(
    "merge-study",
    help="one adapter for all ten digits: the task-vector merges compared",
    description="Merge the digit adapters by every method (task arithmetic, TIES, DARE, magnitude prune) over a grid "
    "of densities and scales, plus a LoraHub-style search over the ten weights; choose on a validation split carved "
    "from the training set (by loss), report on the test set against the base, the best single adapter and the plain "
    "stack at 1/10. Writes merge-study.json and merge-vs-density.png to --out.",
    arguments=_merge_study_arguments,
)
def cmd_merge_study(args: argparse.Namespace) -> int:
    from mnist_peft.experiments.merge_study import StudyConfig, merge_study, study_table
    from mnist_peft.experiments.plots import plot_merge_study
    from mnist_peft.fileio import atomic_write_json
    from mnist_peft.io.adapters import read_adapter

    base = _resolve_base(args.base, args)
    refs = args.adapter or [f"digit-{d}" for d in range(10)]
    files = [read_adapter(_resolve_adapter(a, args)) for a in refs]
    out = Path(args.out)
    result = merge_study(base, files, data_dir=args.data_dir, config=StudyConfig.quick() if args.quick else StudyConfig())
    result["adapters"] = refs
    atomic_write_json(out / "merge-study.json", result)
    plot_merge_study(result, out / "merge-vs-density.png")
    _emit(args, result, "\n".join([*study_table(result), f"wrote {out / 'merge-study.json'} and {out / 'merge-vs-density.png'}"]))
    return 0


def _registry_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "show", "verify", "rm", "add", "export"], help="what to do")
    p.add_argument("name", nargs="?", metavar="NAME", help="entry name or name@version (show, rm, add); the output file (export)")
    p.add_argument("path", nargs="?", metavar="PATH", help="folder to add (add)")
    _add_root(p)
    _add_common(p, data=False)


@command(
    "registry",
    help="list, show, verify, add or remove registry entries",
    description="The local adapter registry (default ./adapters): versioned bases and adapters with sha256 of every "
    "file and the base fingerprint, indexed in index.db (SQLite). 'verify' checks every file and exits 1 if any entry "
    "is bad. 'export [FILE]' writes the index as index.json, the exchange format (default: <root>/index.json).",
    arguments=_registry_arguments,
    tensors=False,
)
def cmd_registry(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.action == "list":
        entries = reg.list()
        payload = {"root": str(reg.root), "entries": [e.to_dict() for e in entries]}
        rows = [f"{'entry':<20} {'kind':<5} {'digit':>5} {'r':>3} {'alpha':>5} {'fingerprint':<14} {'created'}"]
        for e in entries:
            fp = (e.base_fingerprint or "-")[:12]
            rows.append(
                f"{e.ref:<20} {e.kind:<5} {'-' if e.digit is None else e.digit:>5} {e.r or '-':>3} "
                f"{'-' if e.lora_alpha is None else format(e.lora_alpha, 'g'):>5} {fp:<14} {e.created}"
            )
        rows.append(f"{len(entries)} entries in {reg.root}")
        _emit(args, payload, "\n".join(rows))
        return 0
    if args.action == "verify":
        problems = reg.verify()
        payload = {
            "root": str(reg.root),
            "entries": len(reg.list()),
            "ok": not problems,
            "problems": [{"entry": r, "problem": p} for r, p in problems],
        }
        text = "\n".join(f"BAD {r}: {p}" for r, p in problems) or f"all {len(reg.list())} entries verified"
        _emit(args, payload, text)
        if problems and not args.json:
            print(f"error: {len(problems)} bad entr{'y' if len(problems) == 1 else 'ies'}; re-add or pull them", file=sys.stderr)
        return 1 if problems else 0
    if args.action == "export":
        target = reg.export_index(args.name)  # NAME is the output file here (default <root>/index.json)
        _emit(args, {"index": str(target), "entries": len(reg.list())}, f"wrote {target}")
        return 0
    if not args.name:
        raise _usage_error(f"registry {args.action} needs a NAME (or NAME@VERSION)")
    if args.action == "show":
        entry = reg.get(args.name)
        versions = [e.version for e in reg.list() if e.name == entry.name]
        payload = {**entry.to_dict(), "versions": versions, "folder": str(reg.root / entry.path)}
        _emit(args, payload, json.dumps(payload, indent=2, sort_keys=True))
        return 0
    if args.action == "add":
        if not args.path:
            raise _usage_error("registry add needs NAME and PATH (a base or adapter folder)")
        entry = reg.add(args.name, args.path)
        _emit(args, entry.to_dict(), f"added {entry.ref} ({entry.kind}) to {reg.root}")
        return 0
    gone = reg.remove(args.name)  # rm
    _emit(args, {"removed": [e.ref for e in gone]}, f"removed {', '.join(e.ref for e in gone)}")
    return 0


def _quiet_hub(args: argparse.Namespace) -> None:
    from huggingface_hub.utils import disable_progress_bars

    from mnist_peft.fileio import progress_enabled  # torch-free: push and pull start without torch

    if not progress_enabled(getattr(args, "quiet", False)):
        disable_progress_bars()


def _hub_arguments(push: bool) -> Callable[[argparse.ArgumentParser], None]:
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repo-id", required=True, metavar="ID", help="Hub repository, e.g. your-name/mnist-peft")
        name_help = (
            "entry to push (name, or name@version for an older one); repeat; default: the latest of all"
            if push
            else "entry to pull; repeat; default all. NAME@N pulls tag vN of a per-adapter repo (a bundle repo keeps one "
            "version of each entry: pull an older one with --revision)"
        )
        p.add_argument("--name", action="append", metavar="NAME", help=name_help)
        p.add_argument("--revision", metavar="REV", help="branch, tag or commit (default: main)")
        if push:
            p.add_argument("--private", action="store_true", default=None, help="create the repo as private")
            p.add_argument(
                "--per-adapter",
                action="store_true",
                help="also publish each adapter as its own repo ID-NAME, Hub-native: the adapter at the root, a card with "
                "base_model: ID and base_model_relation: adapter, every registry version as a tag vN (the base goes to ID)",
            )
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        _add_root(p)
        _add_common(p, data=False)

    return arguments


@command(
    "push",
    help="push registry entries to a Hugging Face Hub repo",
    description="Push the latest version of every registry entry (or --name ones) to a Hub repo in one commit: the base at "
    "the repo root, each adapter in its own subfolder (PEFT layout), and index.json with every file's sha256. "
    "The commit names the head it was built on; if another push lands first, the index is re-read, re-merged "
    "and committed again, so concurrent pushers lose nothing. Uses HF_TOKEN / `hf auth login`; HF_ENDPOINT "
    "selects another Hub.",
    arguments=_hub_arguments(push=True),
    tensors=False,
)
def cmd_push(args: argparse.Namespace) -> int:
    from mnist_peft.hub.transfer import push_adapters_to_hub, push_to_hub

    _quiet_hub(args)
    if args.per_adapter:
        if args.revision:
            raise _usage_error("--per-adapter pushes to each repo's main branch and tags versions; drop --revision")
        results = push_adapters_to_hub(args.repo_id, registry=_registry(args), names=args.name, private=args.private)
        payload = {"repos": [{"repo_id": r.repo_id, "commit": r.commit, "pushed": r.pushed} for r in results]}
        lines = [f"{r.repo_id}: {', '.join(r.pushed) or 'up to date'}" for r in results]
        lines.append(f"next: mnist-peft pull --repo-id {results[-1].repo_id} --name NAME@VERSION --root OTHER_DIR")
        _emit(args, payload, "\n".join(lines))
        return 0
    res = push_to_hub(args.repo_id, registry=_registry(args), names=args.name, revision=args.revision, private=args.private)
    payload = {"repo_id": res.repo_id, "commit": res.commit, "pushed": res.pushed}
    _emit(
        args,
        payload,
        f"pushed {', '.join(res.pushed)} to {res.repo_id} (commit {res.commit[:12]})\n"
        f"next: mnist-peft pull --repo-id {res.repo_id} --root OTHER_DIR",
    )
    return 0


@command(
    "pull",
    help="pull entries from a Hub repo into the registry",
    description="Pull every entry (or --name ones) of a Hub repo at --revision into the local registry. The repo's index.json "
    "is validated as untrusted input (plain file names, the repo layout's own folders, types) and every file is "
    "checked against its sha256 before anything is added; a failed pull changes nothing. Pulled entries record the "
    "repo id and commit they came from.",
    arguments=_hub_arguments(push=False),
    tensors=False,
)
def cmd_pull(args: argparse.Namespace) -> int:
    from mnist_peft.hub.transfer import pull_from_hub

    _quiet_hub(args)
    res = pull_from_hub(args.repo_id, registry=_registry(args), names=args.name, revision=args.revision)
    payload = {"repo_id": res.repo_id, "revision": res.revision, "added": res.added, "unchanged": res.unchanged}
    text = f"pulled {res.repo_id}@{res.revision[:12]}: added {', '.join(res.added) or 'nothing'}"
    if res.unchanged:
        text += f"; already up to date: {', '.join(res.unchanged)}"
    _emit(args, payload, text + f"\nnext: mnist-peft registry list --root {_registry(args).root}")
    return 0


def _svd_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="DIR", help="base model folder, registry name, or Hub repo id")
    p.add_argument("--digit", type=int, default=9, choices=range(10), metavar="D", help="digit to fine-tune on (default 9)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="ranks to extract (default 1 2 4 8 16 32)")
    p.add_argument("--steps", type=int, default=200, help="full fine-tune steps (default 200)")
    p.add_argument("--plot", metavar="PNG", help="write a plot of accuracy vs rank")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_root(p)
    _add_common(p)


@command(
    "svd",
    help="LoRA by SVD of a full fine-tune: accuracy vs rank",
    description="Fine-tune every weight of the base on one digit (the replay recipe's data and loss), take "
    "W_finetuned - W_base per layer, truncate it by SVD to each rank, and report test accuracy per rank next to "
    "the full fine-tune (the seed's svd.ipynb, as a tool).",
    arguments=_svd_arguments,
)
def cmd_svd(args: argparse.Namespace) -> int:
    from mnist_peft.experiments.svd_sweep import rank_sweep
    from mnist_peft.training.loop import progress_enabled

    base = _resolve_base(args.base, args)
    sweep = rank_sweep(base, args.digit, args.ranks, steps=args.steps, data_dir=args.data_dir, progress=progress_enabled(args.quiet))
    if args.plot:
        from mnist_peft.experiments.plots import plot_curve

        plot_curve(
            [r["r"] for r in sweep["rows"]],
            {
                "LoRA from SVD of the fine-tune delta": [r["accuracy"] for r in sweep["rows"]],
                "full fine-tune": [sweep["full"]["accuracy"]] * len(sweep["rows"]),
                "base": [sweep["base"]["accuracy"]] * len(sweep["rows"]),
            },
            args.plot,
            xlabel="rank r",
            ylabel="test accuracy",
            title=f"digit {args.digit}: accuracy vs SVD rank",
            logx=True,
        )
        sweep["plot"] = str(args.plot)
    d = args.digit
    rows = [f"{'model':<16} {'params':>9} {'accuracy':>8} {'digit ' + str(d) + ' wrong':>14}  rel. error (linear1/2/3)"]
    rows.append(f"{'base':<16} {'-':>9} {sweep['base']['accuracy']:>8.4f} {sweep['base']['wrong_per_digit'][d]:>14}")
    rows.append(
        f"{'full fine-tune':<16} {sweep['full']['parameters']:>9,} {sweep['full']['accuracy']:>8.4f} {sweep['full']['wrong_per_digit'][d]:>14}"
    )
    for r in sweep["rows"]:
        errs = "/".join(f"{e:.3f}" for e in r["relative_error"].values())
        rows.append(f"{'LoRA r=' + str(r['r']):<16} {r['parameters']:>9,} {r['accuracy']:>8.4f} {r['wrong_per_digit'][d]:>14}  {errs}")
    _emit(args, sweep, "\n".join(rows))
    return 0


def _headroom_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_args(p)
    p.add_argument("--cut", type=_fraction, default=0.4, help="fraction of the digit's errors to remove (default 0.4)")
    _add_common(p)


@command(
    "headroom",
    help="how hard a per-digit target is: the best logit-offset trade per digit",
    description="For each digit D, find (exactly, over every offset that changes a prediction) the constant "
    "added to D's logit that cuts D's test errors by at least --cut with the fewest overall errors, and say "
    "whether that keeps overall accuracy. It is chosen on the test set itself, so it is an optimistic "
    "reference for the trade 'say D more readily', against which trained adapters can be read.",
    arguments=_headroom_arguments,
)
def cmd_headroom(args: argparse.Namespace) -> int:
    from mnist_peft.experiments.headroom import logit_offset_tradeoff

    model = _model_from_args(args)
    rows = logit_offset_tradeoff(model, cut=args.cut, data_dir=args.data_dir)
    met = sum(r.both_met for r in rows)
    payload = {"cut": args.cut, "rows": [r.to_dict() for r in rows], "both_met": met}
    pct = f"{args.cut:.0%}"
    lines = [
        f"best constant offset on each digit's logit that cuts its test errors by >= {pct} (chosen on the test set)",
        f"{'digit':>5} {'wrong':>5} {'allowed':>7} {'offset':>7} {'after':>5} {'total wrong':>12}  both targets",
    ]
    for r in rows:
        total = f"{r.total_wrong_before}->{r.total_wrong_after}"
        lines.append(
            f"{r.digit:>5} {r.wrong_before:>5} {r.allowed:>7} {r.offset:>7.3f} {r.wrong_after:>5} {total:>12}  {'yes' if r.both_met else 'no'}"
        )
    lines.append(f"{met}/10 digits can meet both targets (cut >= {pct}, overall errors not up) by an offset alone")
    _emit(args, payload, "\n".join(lines))
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default: demo-out)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (seconds; for tests), not the real numbers")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    _add_root(p)
    _add_common(p)


@command(
    "demo",
    help="the main job: the seed's experiment and ours, end to end, with a report",
    description="Reproduce the seed's digit-9 experiment (and its forgetting), evaluate the ten replay adapters "
    "(from the registry, or trained), a stack and combined adapters, check exact LoRA-off/unmerge, run a short "
    "parity check against peft, an SVD rank sweep and the ten adapters merged into one (merge-study); write "
    "report.md and PNG plots to --out. Finished stages "
    "are skipped on a re-run unless --force.",
    arguments=_demo_arguments,
)
def cmd_demo(args: argparse.Namespace) -> int:
    from mnist_peft.experiments.demo import DemoConfig, run_demo, summary_text
    from mnist_peft.training.loop import progress_enabled

    config = DemoConfig.quick() if args.quick else DemoConfig()
    log = (lambda s: None) if args.json or args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    summary = run_demo(
        args.out,
        config=config,
        root=getattr(args, "root", None),
        force=args.force,
        data_dir=args.data_dir,
        progress=progress_enabled(args.quiet),
        log=log,
    )
    _emit(args, summary, summary_text(summary))
    return 0


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", metavar="DIR", help="base model folder or registry name (default: a seeded random MnistMLP)")
    _add_root(p)
    p.add_argument("--r", type=int, nargs="+", default=[1, 4, 16], help="ranks to test (default: 1 4 16)")
    p.add_argument("--steps", type=int, default=100, help="Adam steps per case (default: 100)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the forward and training batches (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for the base (if random) and the adapters")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)


@command(
    "compare",
    help="native LoRA vs peft parity report",
    description="Build native and peft LoRA models from the same base and seed over a grid of cases (r, alpha, "
    "rsLoRA, target subsets) and report max |diff| of forward outputs, gradients, weights after Adam steps, "
    "merged weights, and whether unmerge is exact. Exit code 1 if any case misses its target.",
    arguments=_compare_arguments,
)
def cmd_compare(args: argparse.Namespace) -> int:
    from mnist_peft.io.peft_compat import default_cases, run_parity
    from mnist_peft.model.data import load_mnist
    from mnist_peft.model.mlp import MnistMLP
    from mnist_peft.training.loop import progress_enabled

    if args.base:
        base = _resolve_base(args.base, args)
    else:
        import torch

        torch.manual_seed(args.seed)
        base = MnistMLP()
    data = load_mnist(train=True, data_dir=args.data_dir)
    n = args.steps * args.batch_size
    results = run_parity(
        base,
        data.x[:n],
        data.y[:n],
        default_cases(tuple(args.r)),
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=progress_enabled(args.quiet),
    )
    ok = all(r.passed for r in results)
    from mnist_peft.io.peft_compat import FORWARD_TOLERANCE, FUSED_TOLERANCE, GRAD_TOLERANCE, MERGE_TOLERANCE_ULPS, TRAIN_TOLERANCE

    tolerances = {
        "forward": FORWARD_TOLERANCE,
        "grad": GRAD_TOLERANCE,
        "train": TRAIN_TOLERANCE,
        "merged_ulps": MERGE_TOLERANCE_ULPS,
        "fused": FUSED_TOLERANCE,
    }
    payload = {"passed": ok, "cases": [r.to_dict() for r in results], "tolerances": tolerances}
    rows = [f"{'case':<36} {'init':>5} {'effect':>8} {'fwd':>8} {'fused':>8} {'grad':>8} {'train':>8} {'ulps':>5} {'unmerge':>7} pass"]
    for r in results:
        rows.append(
            f"{r.case:<36} {r.init_equal!s:>5} {r.adapter_effect:>8.3g} {r.forward_max_diff:>8.2g} {r.fused_max_diff:>8.2g} "
            f"{r.grad_max_diff:>8.2g} {r.train_max_diff:>8.2g} {r.merged_max_ulps:>5.2g} {r.unmerge_exact!s:>7} {r.passed}"
        )
    rows.append(f"{sum(r.passed for r in results)}/{len(results)} cases pass")
    _emit(args, payload, "\n".join(rows))
    return 0 if ok else 1


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", metavar="DIR", help="base model folder or registry name (default: a seeded random MnistMLP)")
    _add_root(p)
    p.add_argument("--reps", type=int, default=7, help="repetitions per figure (median is reported; default 7)")
    p.add_argument(
        "--train-fraction", type=float, default=1.0, help="share of the training set in the train_epoch figure (default 1: one full epoch)"
    )
    p.add_argument(
        "--registry-entries",
        type=int,
        default=10_000,
        metavar="N",
        help="size of the large registry in the registry_add/registry_get figures (default 10000; compared with 10)",
    )
    p.add_argument(
        "--images",
        type=_test_images,
        default=10_000,
        metavar="N",
        help="test images in forward_unmerged and mixed_batch, and at most this many ui_throughput requests "
        "(default 10000, the whole test set)",
    )
    p.add_argument("--only", nargs="+", metavar="FIGURE", help="measure only these figures")
    p.add_argument("--strict", action="store_true", help="exit 1 when a figure misses its target")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)


@command(
    "bench",
    help="performance figures, each as a ratio measured in this run",
    description="Time native LoRA against the bare base model and against peft on the same weights, interleaved, "
    "median of several repetitions. Always exits 0 (it is a measurement) unless --strict.",
    arguments=_bench_arguments,
)
def cmd_bench(args: argparse.Namespace) -> int:
    from mnist_peft.experiments.bench import run_bench
    from mnist_peft.training.loop import progress_enabled

    base = _resolve_base(args.base, args) if args.base else None
    figures = run_bench(
        base=base,
        images=args.images,
        reps=args.reps,
        only=args.only,
        train_fraction=args.train_fraction,
        registry_entries=args.registry_entries,
        data_dir=args.data_dir,
        progress=progress_enabled(args.quiet),
    )
    import platform

    import torch

    machine = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    payload = {"figures": [f.to_dict() for f in figures], "machine": machine}
    rows = [f"{'figure':<18} {'ours':>10} {'peft':>10} {'base':>10} {'unit':>5} {'ratio':>7} {'target':>7} pass"]
    for f in figures:
        fmt = lambda v: "-" if v is None else f"{v:.4g}"  # noqa: E731
        rows.append(
            f"{f.name:<18} {fmt(f.ours):>10} {fmt(f.peft):>10} {fmt(f.base):>10} {f.unit:>5} {f.ratio:>7.3f} {f.target:>7.3g} {f.passed}"
        )
    _emit(args, payload, "\n".join(rows))
    return 1 if args.strict and not all(f.passed for f in figures) else 0


def _ui_arguments(p: argparse.ArgumentParser) -> None:
    _add_root(p)
    p.add_argument("--base", default="base", metavar="REF", help="the base model: registry name, folder or Hub repo id (default: base)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, help="port to listen on (default: the first free one from 7860)")
    p.add_argument("--max-batch-size", type=int, default=32, metavar="N", help="requests the queue batches into one forward (default 32)")
    p.add_argument("--cache-mb", type=float, default=64.0, metavar="MB", help="memory budget of the loaded adapter stacks (default 64)")
    _add_common(p, json_flag=False)


@command(
    "ui",
    help="the web app: draw a digit, switch adapters on, watch the probabilities move",
    description="Start a Gradio app over the registry (read-only): draw a digit and compare the base's probabilities "
    "with those of a weighted stack of adapters; browse the test images the base gets wrong and the adapters that "
    "fix them; the registry's entries, verify status and adapter x digit heat map. Requests from all users are "
    "batched into one mixed-adapter forward; the /predict endpoint serves gradio_client. Needs the ui extra "
    "(pip install -e '.[ui]'). Ctrl-C stops it.",
    arguments=_ui_arguments,
)
def cmd_ui(args: argparse.Namespace) -> int:
    import math

    from mnist_peft.app.ui import launch, require_gradio

    require_gradio()  # before loading anything: a missing extra is the first thing to say
    if args.port is not None and not 0 < args.port < 65536:  # every option is checked before the registry and base load
        raise _usage_error(f"--port {args.port} is not a port number (1..65535)")
    if args.max_batch_size < 1:
        raise _usage_error(f"--max-batch-size {args.max_batch_size} is not a batch size: give an integer >= 1 (default 32)")
    if not (math.isfinite(args.cache_mb) and args.cache_mb >= 0):
        raise _usage_error(f"--cache-mb {args.cache_mb} is not a memory budget: give a finite number of MB >= 0 (default 64)")
    running = launch(
        args.root,
        base=args.base,
        host=args.host,
        port=args.port,
        max_batch_size=args.max_batch_size,
        cache_bytes=int(args.cache_mb * (1 << 20)),
        data_dir=args.data_dir,
    )
    registry = running.handlers.registry.root
    print(f"mnist-peft ui: serving {running.url} (registry {registry}, read-only; Ctrl-C stops it)", flush=True)
    try:
        while running.app.is_running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        running.close()
    return 0


# ----------------------------------------------------------------------------- parser
class _UsageError(Exception):
    pass


def _usage_error(message: str) -> _UsageError:
    return _UsageError(message)


def _add_common(p: argparse.ArgumentParser, *, json_flag: bool = True, data: bool = True) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    if data:
        p.add_argument(
            "--data-dir",
            metavar="DIR",
            help="MNIST data root (default: $MNIST_PEFT_DATA, else a per-user cache folder)",
        )


def _fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a fraction such as 0.4") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is outside (0, 1]; give a fraction such as 0.4 (40%)")
    return value


def _test_images(text: str) -> int:
    """An argparse type: a number of test images, 1..10000."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give a count such as 2000") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"{value} is outside 1..10000 (the test set holds 10000 images)")
    return value


class _LazyChoices:
    """Choices looked up only when argparse checks a value or prints help, so that building the
    parser (every run) imports nothing heavy: the recipes and merge methods live beside torch."""

    def __init__(self, names: Callable[[], Sequence[str]]) -> None:
        self._names = names

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


def _recipe_names(kind: str) -> list[str]:
    from mnist_peft.training.recipes import recipe_names

    return recipe_names(kind)  # type: ignore[arg-type]


def _combine_methods() -> tuple[str, ...]:
    from mnist_peft.merging.combine import METHODS

    return METHODS


def _add_recipe(p: argparse.ArgumentParser, kind: str, *, default: str) -> None:
    """``--recipe``: the choices are the registered recipes of ``kind`` (:mod:`mnist_peft.training.recipes`)."""
    p.add_argument(
        "--recipe",
        choices=_LazyChoices(lambda: _recipe_names(kind)),  # type: ignore[arg-type]
        metavar="NAME",  # argparse would list the choices in the usage line, importing them on every run
        default=default,
        help=f"a registered {kind} recipe: %(choices)s (default: %(default)s; `mnist-peft info` describes them)",
    )


def _add_overrides(p: argparse.ArgumentParser) -> None:
    """What every recipe lets a run override (unset: the recipe's value)."""
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size (samples per step)")
    p.add_argument("--lr", type=float, help="override the recipe's (peak) learning rate")
    p.add_argument("--seed", type=int, help="override the recipe's random seed")


def _add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", metavar="DIR", help="adapter registry folder (default: $MNIST_PEFT_ADAPTERS, else ./adapters)")


def _add_model_args(p: argparse.ArgumentParser, *, adapter_required: bool = False) -> None:
    p.add_argument("--base", required=True, metavar="DIR", help="base model folder, registry name (e.g. base), or Hub repo id")
    p.add_argument(
        "--adapter",
        action="append",
        required=adapter_required,
        metavar="PATH",
        help="adapter folder or registry name (name or name@version); repeat to stack several",
    )
    _add_root(p)
    p.add_argument("--weight", action="append", type=float, metavar="W", help="stack weight of each --adapter, in order (default 1)")
    p.add_argument("--force", action="store_true", help="load adapters even if trained on another base (fingerprint mismatch)")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one ``error:`` line (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``mnist-peft`` parser: one subcommand per entry of :data:`COMMANDS`."""
    parser = _Parser(
        prog="mnist-peft",
        description="Train, store, merge and share LoRA adapters for an MNIST MLP, on PEFT conventions.",
        epilog="Run `mnist-peft COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"mnist-peft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for c in COMMANDS.values():
        p = sub.add_parser(c.name, help=c.help, description=c.description)
        c.arguments(p)
        p.set_defaults(handler=c.handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if COMMANDS[args.command].tensors:
        import torch

        # Late in training, Adam's moments and small gradients become subnormal floats, which x86 CPUs
        # handle ~4x slower (the seed recipe: 82 s -> 23 s). Flushing them to zero changes no result a
        # test set can see. It must happen before PyTorch starts its worker threads, which copy the
        # setting when they are created: hence here, first thing, and not inside fit().
        torch.set_flush_denormal(True)
    try:
        return args.handler(args)
    except _UsageError as exc:
        parser.exit(2, f"error: {exc}\n")
    except BrokenPipeError:  # e.g. `mnist-peft registry list | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (MnistPeftError, ValueError, OSError) as exc:
        if os.environ.get("MNIST_PEFT_DEBUG"):
            raise
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug: still one line, with the way to the traceback
        if os.environ.get("MNIST_PEFT_DEBUG"):
            raise
        detail = " ".join(str(exc).split())
        print(
            f"error: unexpected {type(exc).__name__}: {detail} (a bug: rerun with MNIST_PEFT_DEBUG=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

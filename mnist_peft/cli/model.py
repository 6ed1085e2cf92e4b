"""Commands about the base model: ``info``, ``train-base``, ``eval`` and ``compare`` (parity with peft)."""

from __future__ import annotations

import argparse
import time

from mnist_peft import __version__

from .common import (
    add_common,
    add_model_args,
    add_overrides,
    add_recipe,
    add_root,
    emit,
    fmt_ints,
    model_from_args,
    out_folder,
    register_output,
    resolve_base,
    show_progress,
)
from .table import command

__all__ = ["cmd_info", "cmd_train_base", "cmd_eval", "cmd_compare", "confusion_lines"]


def _info_arguments(p: argparse.ArgumentParser) -> None:
    add_common(p)


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
    emit(args, payload, "\n".join(lines))
    return 0


def _train_base_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", help="folder to save the model in")
    p.add_argument("--register", metavar="NAME", help="also add the model to the registry under NAME (e.g. base)")
    add_root(p)
    add_recipe(p, "base", default="default")
    p.add_argument("--epochs", type=float, help="override the recipe's number of epochs")
    add_overrides(p)
    p.add_argument("--val-size", type=int, help="hold out this many training images for early stopping")
    p.add_argument("--patience", type=int, help="epochs without validation gain before stopping")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common(p)


@command(
    "train-base",
    help="train a base MnistMLP and save it",
    description="Train a fresh base model on the MNIST training set, evaluate it on the test set and save it "
    "(config.json + model.safetensors + README.md).",
    arguments=_train_base_arguments,
)
def cmd_train_base(args: argparse.Namespace) -> int:
    from mnist_peft.training.loop import evaluate
    from mnist_peft.training.recipes import train_base

    out, _tmp = out_folder(args)
    start = time.perf_counter()
    model, fit = train_base(
        args.recipe,
        data_dir=args.data_dir,
        progress=show_progress(args),
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
    registered = register_output(args, out, {"accuracy": result.accuracy, "wrong_per_digit": result.wrong_per_digit})
    payload["registered"] = registered
    where = f"{registered['name']}@{registered['version']}" if registered else str(out)
    text = (
        f"trained {args.recipe} recipe: {fit.steps} steps in {train_seconds:.1f} s\n"
        f"test accuracy {result.accuracy:.4f}; wrong per digit 0..9: {fmt_ints(result.wrong_per_digit)}\n"
        f"saved to {where} (next: mnist-peft eval --base {where})"
    )
    emit(args, payload, text)
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--merged", action="store_true", help="merge the adapters into the weights before evaluating")
    p.add_argument("--plot", metavar="PNG", help="also write a bar chart of per-digit error rates")
    add_common(p)


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

    model = model_from_args(args)
    result = evaluate(model, data_dir=args.data_dir)
    payload = result.to_dict()
    if args.plot:
        plot_error_rates({"model": result.error_rate_per_digit}, args.plot)
        payload["plot"] = str(args.plot)
    lines = [
        f"accuracy {result.accuracy:.4f} on {result.n} test images",
        f"wrong per digit 0..9: {fmt_ints(result.wrong_per_digit)}",
        f"error rate per digit: {' '.join(f'{r:.3f}' for r in result.error_rate_per_digit)}",
        *confusion_lines(result.confusion),
    ]
    if args.plot:
        lines.append(f"plot: {args.plot}")
    emit(args, payload, "\n".join(lines))
    return 0


def confusion_lines(confusion: list[list[int]]) -> list[str]:
    """The confusion matrix as aligned text: a row per true digit, a column per predicted one.

    Example:
        >>> confusion_lines([[5, 1], [0, 7]])
        ['confusion (rows: true digit, columns: predicted):', '     0 1', '  0: 5 1', '  1: 0 7']
    """
    width = max(len(str(n)) for row in confusion for n in row)
    cell = lambda v: f"{v:>{width}}"  # noqa: E731
    lines = ["confusion (rows: true digit, columns: predicted):", "     " + " ".join(cell(d) for d in range(len(confusion)))]
    lines += [f"{t:>3}: " + " ".join(cell(n) for n in row) for t, row in enumerate(confusion)]
    return lines


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", metavar="DIR", help="base model folder or registry name (default: a seeded random MnistMLP)")
    add_root(p)
    p.add_argument("--r", type=int, nargs="+", default=[1, 4, 16], help="ranks to test (default: 1 4 16)")
    p.add_argument("--steps", type=int, default=100, help="Adam steps per case (default: 100)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of the forward and training batches (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed for the base (if random) and the adapters")
    p.add_argument(
        "--use-dora",
        action="store_true",
        help="DoRA instead of LoRA (peft's LoraConfig(use_dora=True)): per rank, three cases in float32 and three in "
        "float64; adds the gradient of the magnitude vector (mgrad), holds the fast inference path to its derived "
        "bound (column bound: sqrt(n) * eps * max|y|, n the longest adapted row), and measures 1,000 merge/unmerge "
        "cycles on linear3 per dtype: ours must equal the original weight bit for bit, peft's drift is reported",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common(p)


@command(
    "compare",
    help="native LoRA (or DoRA) vs peft parity report",
    description="Build native and peft LoRA models from the same base and seed over a grid of cases (r, alpha, "
    "rsLoRA, target subsets) and report max |diff| of forward outputs, gradients, weights after Adam steps, "
    "merged weights, and whether unmerge is exact. With --use-dora: DoRA cases in float32 and float64 (float64 pairs "
    "get our adapter weights copied into peft's, whose float32 draws differ; the seeded init is checked in float32), "
    "the magnitude vector's gradient, and peft's unmerge drift over 1,000 merge/unmerge cycles beside ours. "
    "Exit code 1 if any case misses its target.",
    arguments=_compare_arguments,
)
def cmd_compare(args: argparse.Namespace) -> int:
    from mnist_peft.io.peft_compat import default_cases, dora_cases, run_parity
    from mnist_peft.model.data import load_mnist
    from mnist_peft.model.mlp import MnistMLP

    if args.base:
        base = resolve_base(args.base, args)
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
        dora_cases(tuple(args.r)) if args.use_dora else default_cases(tuple(args.r)),
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=show_progress(args),
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
    if args.use_dora:
        return _compare_dora(args, base, results, payload)
    rows = [f"{'case':<36} {'init':>5} {'effect':>8} {'fwd':>8} {'fused':>8} {'grad':>8} {'train':>8} {'ulps':>5} {'unmerge':>7} pass"]
    for r in results:
        rows.append(
            f"{r.case:<36} {r.init_equal!s:>5} {r.adapter_effect:>8.3g} {r.forward_max_diff:>8.2g} {r.fused_max_diff:>8.2g} "
            f"{r.grad_max_diff:>8.2g} {r.train_max_diff:>8.2g} {r.merged_max_ulps:>5.2g} {r.unmerge_exact!s:>7} {r.passed}"
        )
    rows.append(f"{sum(r.passed for r in results)}/{len(results)} cases pass")
    emit(args, payload, "\n".join(rows))
    return 0 if ok else 1


def _compare_dora(args: argparse.Namespace, base, results: list, payload: dict) -> int:
    """``compare --use-dora``: the DoRA columns (fast path and its bound, the magnitude gradient) and the
    drift lines (:func:`~mnist_peft.io.peft_compat.unmerge_drift`, float32 and float64)."""
    from mnist_peft.io.peft_compat import DRIFT_CYCLES, drift_case, unmerge_drift

    drifts = [unmerge_drift(base, drift_case(dtype), cycles=DRIFT_CYCLES, seed=args.seed + 1) for dtype in ("float32", "float64")]
    ok = payload["passed"] and all(d.ours_exact for d in drifts)
    payload.update(passed=ok, drift=[d.to_dict() for d in drifts])
    payload["tolerances"]["fast"] = "fast_bound per case: sqrt(n) * eps * max|y|, n the longest adapted row"
    rows = [
        f"{'case':<52} {'init':>5} {'effect':>8} {'fwd':>8} {'fast':>8} {'bound':>8} {'grad':>8} {'mgrad':>8} {'train':>8} "
        f"{'ulps':>5} {'unmerge':>7} pass"
    ]
    for r in results:
        rows.append(
            f"{r.case:<52} {r.init_equal!s:>5} {r.adapter_effect:>8.3g} {r.forward_max_diff:>8.2g} {r.fused_max_diff:>8.2g} "
            f"{r.fast_bound:>8.2g} {r.grad_max_diff:>8.2g} {r.magnitude_grad_max_diff:>8.2g} {r.train_max_diff:>8.2g} "
            f"{r.merged_max_ulps:>5.2g} {r.unmerge_exact!s:>7} {r.passed}"
        )
    rows.append(f"{sum(r.passed for r in results)}/{len(results)} cases pass")
    for d in drifts:
        rows.append(
            f"unmerge drift, {d.case}, {d.cycles:,} merge/unmerge cycles: ours equal to the original: {d.ours_exact}; "
            f"peft max |drift| after 1 cycle {d.peft_drift_first:.3g}, after {d.cycles:,} {d.peft_drift_last:.3g}"
        )
    emit(args, payload, "\n".join(rows))
    return 0 if ok else 1

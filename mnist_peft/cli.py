"""The ``mnist-peft`` command: a thin table of subcommands over the library.

``main(argv) -> int`` is callable from tests. Library errors become one ``error: ...`` line on
stderr and exit code 1; usage errors exit 2 (argparse).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .errors import MnistPeftError

__all__ = ["main", "build_parser"]

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Handler] = {}


def _emit(args: argparse.Namespace, payload: dict, text: str) -> None:
    """One JSON object with ``--json``, else human-readable text."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(text)


def _fmt_ints(values: Sequence[int]) -> str:
    return " ".join(str(v) for v in values)


# ----------------------------------------------------------------------------- commands
def cmd_info(args: argparse.Namespace) -> int:
    from .data import resolve_data_root
    from .model import MnistMLP, count_parameters

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
    _emit(args, payload, "\n".join(lines))
    return 0


def cmd_train_base(args: argparse.Namespace) -> int:
    from .train import evaluate, progress_enabled, train_base

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise _usage_error(f"output folder {str(out)!r} is not empty; pass --force to overwrite it")
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
    from .model import base_fingerprint

    payload = {
        "recipe": args.recipe,
        "out": str(out),
        "steps": fit.steps,
        "train_seconds": round(train_seconds, 2),
        "stopped_early": fit.stopped_early,
        "fingerprint": base_fingerprint(model),
        **result.to_dict(),
    }
    text = (
        f"trained {args.recipe} recipe: {fit.steps} steps in {train_seconds:.1f} s\n"
        f"test accuracy {result.accuracy:.4f}; wrong per digit 0..9: {_fmt_ints(result.wrong_per_digit)}\n"
        f"saved to {out} (next: mnist-peft eval --base {out})"
    )
    _emit(args, payload, text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .model import load_base
    from .plots import plot_error_rates
    from .train import evaluate

    model = load_base(args.base)
    result = evaluate(model, data_dir=args.data_dir)
    payload = result.to_dict()
    if args.plot:
        plot_error_rates({"base": result.error_rate_per_digit}, args.plot)
        payload["plot"] = str(args.plot)
    text = (
        f"accuracy {result.accuracy:.4f} on {result.n} test images\n"
        f"wrong per digit 0..9: {_fmt_ints(result.wrong_per_digit)}\n"
        f"error rate per digit: {' '.join(f'{r:.3f}' for r in result.error_rate_per_digit)}"
    )
    _emit(args, payload, text)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-peft",
        description="Train, store, merge and share LoRA adapters for an MNIST MLP, on PEFT conventions.",
        epilog="Run `mnist-peft COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"mnist-peft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("info", help="describe the model and where data lives", description="Describe the MNIST MLP (parameter count, layers) and the data root.")
    _add_common(p)
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser(
        "train-base",
        help="train a base MnistMLP and save it",
        description="Train a fresh base model on the MNIST training set, evaluate it on the test set and save it "
        "(config.json + model.safetensors + README.md).",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder to save the model in")
    p.add_argument("--recipe", choices=["seed", "default"], default="default", help="seed: the seed notebook's recipe (batch 10, 1 epoch, Adam 1e-3); default: ours (batch 128, 5 epochs, one-cycle LR)")
    p.add_argument("--epochs", type=float, help="override the recipe's number of epochs")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size")
    p.add_argument("--lr", type=float, help="override the recipe's (peak) learning rate")
    p.add_argument("--seed", type=int, help="override the recipe's random seed")
    p.add_argument("--val-size", type=int, help="hold out this many training images for early stopping")
    p.add_argument("--patience", type=int, help="epochs without validation gain before stopping")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(handler=cmd_train_base)

    p = sub.add_parser(
        "eval",
        help="test accuracy and per-digit errors of a model",
        description="Evaluate a base model on the 10,000 MNIST test images: accuracy, wrong count and error rate per digit.",
    )
    p.add_argument("--base", required=True, metavar="DIR", help="base model folder or Hub repo id")
    p.add_argument("--plot", metavar="PNG", help="also write a bar chart of per-digit error rates")
    _add_common(p)
    p.set_defaults(handler=cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except _UsageError as exc:
        parser.exit(2, f"error: {exc}\n")
    except (MnistPeftError, ValueError, OSError) as exc:
        if os.environ.get("MNIST_PEFT_DEBUG"):
            raise
        print("error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

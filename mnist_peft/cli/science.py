"""``forgetting-study``: the recipes that fight forgetting, chosen on validation, reported on test."""

from __future__ import annotations

import argparse
import sys

from .common import add_common, add_root, emit, resolve_base
from .table import command

__all__ = ["cmd_forgetting_study"]


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="base", metavar="REF", help="the base the adapters are reported on (default: base)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for forgetting.json, the study base and the seed-0 adapters")
    p.add_argument(
        "--quick", action="store_true", help="digits 8 and 9, seed 0, one candidate each, 20 steps (a smoke test, not the numbers)"
    )
    add_root(p)
    add_common(p)


@command(
    "forgetting-study",
    help="elastic distortions and null-space projection against forgetting: chosen on validation, ten digits x seeds 0-2 on test",
    description="Train the forgetting recipes (replay-affine, the control; elastic: the digit's images elastically "
    "distorted; null-space: A kept off the directions the other digits' layer inputs use; elastic-null-space: both) "
    "beside replay. The elastic alpha and the null-space energy are chosen on a validation split that neither a study "
    "base (trained the registry base's way on the rest of the training set) nor its adapters trained on (their early "
    "stopping reads it); then each recipe "
    "trains ten adapters on --base for seeds 0, 1 and 2, reported on the test set: per digit the seed-mean errors and "
    "accuracy, and how many digits meet both targets (errors cut by >= 40%, accuracy not below the base's). About 25 "
    "minutes on 2 cores. Writes forgetting.json and each recipe's seed-0 adapters to --out (adapters/<recipe>/digit-D).",
    arguments=_arguments,
)
def cmd_forgetting_study(args: argparse.Namespace) -> int:
    from mnist_peft.experiments.forgetting import ForgettingConfig, forgetting_study, study_table

    base = resolve_base(args.base, args)
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if not args.json else (lambda line: None)
    result = forgetting_study(base, args.out, data_dir=args.data_dir, config=ForgettingConfig.quick() if args.quick else None, say=say)
    chosen = result["chosen"]
    lines = [f"chosen on validation: elastic alpha {chosen['alpha']:g}, null-space energy {chosen['energy']:g}", *study_table(result)]
    emit(args, result, "\n".join([*lines, f"wrote {args.out}/forgetting.json"]))
    return 0

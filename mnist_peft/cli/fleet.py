"""``train-adapters``: a fleet of adapters trained at once (batched here, or on Ray) and registered in one write."""

from __future__ import annotations

import argparse

from mnist_peft.errors import MnistPeftError

from .common import LazyChoices, UsageError, add_common, add_recipe, add_root, emit
from .table import command

__all__ = ["cmd_train_adapters"]


def _executor_names() -> list[str]:
    from mnist_peft.fleet.executors.table import EXECUTORS  # the table, not a list of its own: a new executor is a new choice

    return list(EXECUTORS)


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
    p.add_argument("--executor", choices=LazyChoices(_executor_names), default="local", metavar="NAME", help="local: all adapters in one batched loop here "
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
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="the most the jobs may take in all; a job not ended by then fails by name (Ray tasks are cancelled); default: no limit",
    )
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="POINTS",
        help="quality gate: a result whose test accuracy is more than POINTS below the base's fails its job, as does one that "
        "makes its own digit worse or changes nothing (default 0.5; replay adapters cost 0.00-0.14)",
    )
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="if some jobs fail for good, keep and register the others (exit status 3 says some failed)",
    )
    add_root(p)
    add_recipe(p, "adapter", default="replay")
    p.add_argument("--r", type=int, help="LoRA rank (recipe default)")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument(
        "--use-dora",
        action="store_true",
        default=None,
        help="train DoRA adapters (peft's use_dora: LoRA plus a trained magnitude vector per layer); each still equals its "
        "solo train-adapter --use-dora run",
    )
    p.add_argument("--steps", type=int, help="override the recipe's number of optimiser steps")
    p.add_argument("--batch-size", type=int, help="override the recipe's batch size (samples per step)")
    p.add_argument("--lr", type=float, help="override the recipe's (peak) learning rate")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_common(p)


def _check_fleet_flags(args: argparse.Namespace) -> None:
    """The flag combinations ``train-adapters`` refuses before it starts anything."""
    if not args.out and not args.register:
        raise UsageError("give --register PREFIX, --out DIR, or both")
    if args.push and not args.register:
        raise UsageError("--push needs --register PREFIX (the fleet is pushed from the registry)")
    if args.executor == "local" and (args.ray_address or args.retries is not None):
        raise UsageError("--ray-address and --retries apply to --executor ray only")
    if args.retries is not None and args.retries < 0:
        raise UsageError(f"--retries must be >= 0, got {args.retries}")


def _fleet_jobs(args: argparse.Namespace) -> list:
    """The jobs of ``--digits`` x ``--seeds``; a bad list is a usage error."""
    from mnist_peft.fleet.jobs import fleet_jobs, parse_digits

    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        return fleet_jobs(
            parse_digits(args.digits),
            seeds,
            prefix=args.register or "digit",
            recipe=args.recipe,
            r=args.r,
            lora_alpha=args.lora_alpha,
            use_dora=args.use_dora,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
        )
    except ValueError as exc:  # --digits, --seeds or --register (recipe values are checked by run_fleet: exit 1)
        message = str(exc) if isinstance(exc, MnistPeftError) else f"--seeds {args.seeds!r}: expected integers, e.g. 0,1,2"
        raise UsageError(message) from None


def _fleet_text(args: argparse.Namespace, res, adapter_type: str) -> str:
    """The human-readable report of a fleet run."""
    kind = "" if adapter_type == "lora" else f" {'DoRA' if adapter_type == 'dora' else adapter_type}"
    lines = [f"trained {len(res.trained)}{kind} adapters with the {res.executor} executor in {res.seconds:.1f} s"]
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
    return "\n".join(lines)


@command(
    "train-adapters",
    help="train a fleet of adapters at once (batched here, or on Ray) and register it in one write",
    description="Train one adapter per digit (and seed) on one base. --executor local trains them together in one batched "
    "loop (one base GEMM per layer for all of them; each adapter equals its solo train-adapter run); --executor ray runs "
    "each as a Ray task (workers read the base from the registry or the Hub; killed workers are retried). The driver "
    "checks every returned adapter, then registers the whole fleet in one registry write (--register) and, if asked, "
    "pushes it in one Hub commit (--push). A job that fails for good fails the fleet and nothing is registered, unless "
    "--allow-partial (then the others are kept and the exit status is 3). Every result passes a quality gate before it is "
    "registered (--max-accuracy-drop; its own digit not worse); --timeout bounds the whole run.",
    arguments=_train_adapters_arguments,
)
def cmd_train_adapters(args: argparse.Namespace) -> int:
    from mnist_peft.fleet.run import run_fleet

    _check_fleet_flags(args)
    jobs = _fleet_jobs(args)
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
        timeout=args.timeout,
        **({} if args.max_accuracy_drop is None else {"max_accuracy_drop": args.max_accuracy_drop}),  # default: run_fleet's
    )
    adapter_type = jobs[0].resolved()[1].adapter_config().adapter_type  # one recipe, one set of overrides for every job
    payload = {
        "adapter_type": adapter_type,
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
    emit(args, payload, _fleet_text(args, res, adapter_type))
    return 3 if res.failed else 0

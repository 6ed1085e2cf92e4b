"""The experiment commands: ``merge-study``, ``svd`` (rank sweep), ``headroom``, ``demo`` and ``bench``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import add_common, add_model_args, add_root, emit, fraction, model_from_args, resolve_adapter, resolve_base, show_progress
from .table import command

__all__ = ["cmd_merge_study", "cmd_svd", "cmd_headroom", "cmd_demo", "cmd_bench"]


def _merge_study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="base", metavar="DIR", help="base model folder or registry name (default: base)")
    p.add_argument(
        "--adapter", action="append", metavar="PATH", help="adapter folder or registry name; repeat (default: digit-0 ... digit-9)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for merge-study.json and merge-vs-density.png")
    p.add_argument("--quick", action="store_true", help="a small grid (for a smoke test)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_root(p)
    add_common(p)


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
    from mnist_peft.experiments.merge_study import StudyConfig, merge_study, study_evaluations, study_table
    from mnist_peft.experiments.plots import plot_merge_study
    from mnist_peft.fileio import atomic_write_json
    from mnist_peft.io.adapters import read_adapter
    from mnist_peft.merging.methods import DELTA_METHODS
    from mnist_peft.progress import Progress

    base = resolve_base(args.base, args)
    refs = args.adapter or [f"digit-{d}" for d in range(10)]
    files = [read_adapter(resolve_adapter(a, args)) for a in refs]
    out = Path(args.out)
    config = StudyConfig.quick() if args.quick else StudyConfig()
    total = study_evaluations(config, DELTA_METHODS, len(files))
    with Progress(total, "merge-study", enabled=show_progress(args), unit="evaluation") as bar:
        result = merge_study(base, files, data_dir=args.data_dir, config=config, progress=lambda done, _: bar.update(done - bar.n))
    result["adapters"] = refs
    atomic_write_json(out / "merge-study.json", result)
    plot_merge_study(result, out / "merge-vs-density.png")
    emit(args, result, "\n".join([*study_table(result), f"wrote {out / 'merge-study.json'} and {out / 'merge-vs-density.png'}"]))
    return 0


def _svd_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="DIR", help="base model folder, registry name, or Hub repo id")
    p.add_argument("--digit", type=int, default=9, choices=range(10), metavar="D", help="digit to fine-tune on (default 9)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32], help="ranks to extract (default 1 2 4 8 16 32)")
    p.add_argument("--steps", type=int, default=200, help="full fine-tune steps (default 200)")
    p.add_argument("--plot", metavar="PNG", help="write a plot of accuracy vs rank")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_root(p)
    add_common(p)


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

    base = resolve_base(args.base, args)
    # a bar on a terminal, a line every few seconds otherwise (the training loop's own display)
    sweep = rank_sweep(base, args.digit, args.ranks, steps=args.steps, data_dir=args.data_dir, progress=show_progress(args))
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
    emit(args, sweep, "\n".join(rows))
    return 0


def _headroom_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--cut", type=fraction, default=0.4, help="fraction of the digit's errors to remove (default 0.4)")
    add_common(p)


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

    model = model_from_args(args)
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
    emit(args, payload, "\n".join(lines))
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default: demo-out)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--quick", action="store_true", help="a tiny configuration (seconds; for tests), not the real numbers")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    add_root(p)
    add_common(p)


@command(
    "demo",
    help="the main job: the seed's experiment and ours, end to end, with a report",
    description="Reproduce the seed's digit-9 experiment (and its forgetting), evaluate the ten replay adapters "
    "(from the registry, or trained), a stack and combined adapters, check exact LoRA-off/unmerge, run a short "
    "parity check against peft, an SVD rank sweep and the ten adapters merged into one (merge-study, on a coarser "
    "grid, stated in the report); write report.md and PNG plots to --out, and print every stage's time. Each stage "
    "shows its progress (a bar on a terminal, a line every few seconds with an estimate otherwise). Finished stages "
    "are skipped on a re-run unless --force.",
    arguments=_demo_arguments,
)
def cmd_demo(args: argparse.Namespace) -> int:
    from mnist_peft.experiments.demo import run_demo, summary_text
    from mnist_peft.experiments.demo_stages import DemoConfig

    config = DemoConfig.quick() if args.quick else DemoConfig()
    log = (lambda s: None) if args.json or args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    summary = run_demo(
        args.out,
        config=config,
        root=getattr(args, "root", None),
        force=args.force,
        data_dir=args.data_dir,
        progress=show_progress(args),
        log=log,
    )
    emit(args, summary, summary_text(summary))
    return 0


def _test_images(text: str) -> int:
    """An argparse type: a number of test images, 1..10000."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give a count such as 2000") from None
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"{value} is outside 1..10000 (the test set holds 10000 images)")
    return value


def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", metavar="DIR", help="base model folder or registry name (default: a seeded random MnistMLP)")
    add_root(p)
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
        help="test images in forward_unmerged, mixed_batch, forward_dora and mixed_lora_dora, and at most this many ui_throughput requests "
        "(default 10000, the whole test set)",
    )
    p.add_argument("--only", nargs="+", metavar="FIGURE", help="measure only these figures")
    p.add_argument("--strict", action="store_true", help="exit 1 when a figure misses its target")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_common(p)


@command(
    "bench",
    help="performance figures, each as a ratio measured in this run",
    description="Time native LoRA against the bare base model and against peft on the same weights, interleaved, "
    "median of several repetitions. Always exits 0 (it is a measurement) unless --strict.",
    arguments=_bench_arguments,
)
def cmd_bench(args: argparse.Namespace) -> int:
    from mnist_peft.experiments.bench import run_bench

    base = resolve_base(args.base, args) if args.base else None
    figures = run_bench(
        base=base,
        images=args.images,
        reps=args.reps,
        only=args.only,
        train_fraction=args.train_fraction,
        registry_entries=args.registry_entries,
        data_dir=args.data_dir,
        progress=show_progress(args),
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
    emit(args, payload, "\n".join(rows))
    return 1 if args.strict and not all(f.passed for f in figures) else 0

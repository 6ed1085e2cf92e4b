"""A fleet's jobs: digit lists, one job per (digit, seed), and the checks a job passes before any work."""

from __future__ import annotations

from collections.abc import Sequence

from mnist_peft.errors import InvalidArgumentError, TrainConfigError
from mnist_peft.training.batched import AdapterJob

__all__ = ["parse_digits", "fleet_jobs", "check_job", "MNIST_TRAIN_SIZE"]

MNIST_TRAIN_SIZE = 60_000


def parse_digits(text: str) -> list[int]:
    """``"0-9"``, ``"3"``, ``"1,4,7"`` or ``"0-2,9"`` -> a sorted list of distinct digits.

    Raises:
        InvalidArgumentError: anything else, or a digit outside 0..9.
    """
    import re

    digits: set[int] = set()
    for part in str(text).split(","):
        found = re.fullmatch(r"\s*([0-9])\s*(?:-\s*([0-9])\s*)?", part)
        if found is None:
            raise InvalidArgumentError(f"digits {text!r}: expected e.g. '0-9', '3' or '1,4,7'")
        a = int(found[1])
        b = int(found[2]) if found[2] is not None else a
        if not (0 <= a <= b <= 9):
            raise InvalidArgumentError(f"digits {text!r}: each digit must be 0..9 and ranges must go up (e.g. '2-5')")
        digits.update(range(a, b + 1))
    return sorted(digits)


def fleet_jobs(digits: Sequence[int], seeds: Sequence[int] = (0,), *, prefix: str = "digit", **overrides: object) -> list[AdapterJob]:
    """One job per (digit, seed): named ``PREFIX-D``, or ``PREFIX-D-sS`` when there are several seeds.

    ``overrides`` are recipe fields (``recipe`` picks the recipe by name; ``None`` values are ignored).
    """
    recipe = str(overrides.pop("recipe", None) or "replay")
    extra = {k: v for k, v in overrides.items() if v is not None}
    seeds = list(dict.fromkeys(seeds)) or [0]
    bad = [s for s in seeds if type(s) is not int or not 0 <= s < 2**63]
    if bad:
        raise InvalidArgumentError(f"seeds must be integers from 0 to 2**63 - 1, got {bad}")
    sep = "" if prefix.endswith(("-", "_", ".")) else "-"
    return [
        AdapterJob(d, recipe, tuple(sorted({**extra, "seed": seed}.items())), f"{prefix}{sep}{d}" + (f"-s{seed}" if len(seeds) > 1 else ""))
        for d in digits
        for seed in seeds
    ]


def check_job(job: AdapterJob) -> None:
    """Every value a worker would trip over, checked on the driver before any work starts."""
    _, recipe = job.resolved()
    recipe.adapter_config()  # r, alpha, init
    recipe.fit_config()  # batch size, lr, schedule, patience, eval_every
    if not (type(recipe.val_size) is int and 0 <= recipe.val_size < MNIST_TRAIN_SIZE):
        raise TrainConfigError(f"job {job.name}: val_size must be an integer in [0, {MNIST_TRAIN_SIZE}), got {recipe.val_size!r}")
    if not (type(recipe.seed) is int and 0 <= recipe.seed < 2**63):
        raise TrainConfigError(f"job {job.name}: seed must be an integer from 0 to 2**63 - 1, got {recipe.seed!r}")

"""What a ``remote`` executor hands back, read as untrusted files: checked, re-scored and rewritten by the driver."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mnist_peft.errors import FleetError
from mnist_peft.model.data import load_mnist
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.training.batched import AdapterJob
from mnist_peft.training.loop import evaluate
from mnist_peft.training.recipes import AdapterTrainResult
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel

from .executors.base import FleetAdapter, check_returned_folder, save_fleet_adapter

if TYPE_CHECKING:
    from mnist_peft.io.adapters import AdapterFiles

__all__ = ["accept_returned", "check_returned"]


def accept_returned(
    returned: list[FleetAdapter],
    jobs: Sequence[AdapterJob],
    base: MnistMLP,
    base_ref: str,
    fingerprint: str,
    failed: dict[str, str],
    *,
    data_dir: str | None,
    tmp: str,
) -> list[FleetAdapter]:
    """What Ray workers handed back, read as untrusted files. Only the tensor values are kept: each
    adapter that passes is loaded onto the driver's base, evaluated here, and written again by the
    driver (its config, metadata and card), as the local executor writes it. A folder that fails a
    check makes its job a failed one."""
    from mnist_peft.io.adapters import load_adapter, read_adapter

    if not returned:
        return []
    by_name = {j.name: j for j in jobs}
    test = load_mnist(train=False, data_dir=data_dir)
    before = evaluate(base, test)
    accepted = []
    for a in returned:
        job = by_name[a.name]
        try:
            files = read_adapter(check_returned_folder(a.name, a.folder, tmp))
            steps = check_returned(files, job, fingerprint)
            model = LoraModel(copy.deepcopy(base))
            load_adapter(model, files, base_fingerprint=fingerprint)  # keys, shapes, finite values
            model.set_adapter("default")
            name, _ = job.resolved()
            result = AdapterTrainResult(job.digit, name, steps, 0.0, False, before, evaluate(model.eval(), test))
            accepted.append(save_fleet_adapter(model, result, job, base_ref, str(Path(tmp) / "accepted" / job.name)))
        except Exception as exc:  # anything a malformed file can raise: this job failed, the others go on
            failed[a.name] = f"returned adapter refused: {exc}"[:1000]
    return accepted


def check_returned(files: AdapterFiles, job: AdapterJob, fingerprint: str) -> int:
    """The adapter a worker returned is the job's: trained on the driver's base, for its digit, with
    the config the job's recipe makes, and a step count the recipe allows. Returns the steps."""
    import re

    _, recipe = job.resolved()
    meta = files.metadata
    got = meta.get("base_fingerprint")
    if got != fingerprint:
        raise FleetError(
            f"job {job.name} returned an adapter trained on another base (fingerprint {str(got)[:12]}..., the driver's is "
            f"{fingerprint[:12]}...); check that every worker reads the same base",
            failed={job.name: "trained on another base"},
        )
    expected = LoraConfig(r=recipe.r, lora_alpha=recipe.lora_alpha, init_lora_weights=recipe.init_lora_weights)
    cfg = files.config
    fields = ("r", "lora_alpha", "lora_dropout", "use_rslora", "bias")
    wrong = {k: getattr(cfg, k) for k in fields if getattr(cfg, k) != getattr(expected, k)}
    if sorted(cfg.target_modules) != sorted(expected.target_modules):
        wrong["target_modules"] = sorted(cfg.target_modules)
    if meta.get("digit") != str(job.digit):
        wrong["digit"] = meta.get("digit")
    steps = meta.get("steps", "")
    if not (re.fullmatch(r"[0-9]{1,9}", steps) and 1 <= int(steps) <= recipe.steps):
        wrong["steps"] = steps
    if wrong:
        raise FleetError(f"job {job.name} returned an adapter that is not the job's: {wrong}", failed={job.name: str(wrong)})
    return int(steps)

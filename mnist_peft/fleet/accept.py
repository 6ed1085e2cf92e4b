"""What a fleet keeps: a ``remote`` executor's folders read as untrusted files (checked, re-scored and
rewritten by the driver), and the quality gate every result passes before it is registered."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from mnist_peft.errors import FleetError
from mnist_peft.model.data import load_mnist
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.training.batched import AdapterJob
from mnist_peft.training.loop import evaluate
from mnist_peft.training.recipes import AdapterTrainResult
from mnist_peft.tuners.lora.model import LoraModel

from .executors.base import FleetAdapter, check_returned_folder, save_fleet_adapter

if TYPE_CHECKING:
    from mnist_peft.io.adapters import AdapterFiles

__all__ = ["DEFAULT_MAX_ACCURACY_DROP", "accept_returned", "check_returned", "quality_gate"]

DEFAULT_MAX_ACCURACY_DROP = 0.5
"""Points of test accuracy a fleet adapter may cost below its base's by default (``--max-accuracy-drop``):
the replay adapters of docs/results.md cost 0.00-0.14 points; a wrong or broken adapter costs far more."""


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
    the config the job's recipe makes (its type, LoRA or DoRA, rank, alpha, ...), and a step count the
    recipe allows. Returns the steps."""
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
    expected = recipe.adapter_config()
    cfg = files.config
    fields = ("adapter_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "bias")  # a LoRA result for a DoRA job is not the job's
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


def quality_gate(
    adapter: FleetAdapter, *, max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP, base: nn.Module | None = None
) -> str | None:
    """Why a fleet result may not be kept, with its numbers (None: it passes). Its metrics are the
    driver's, on the test set: overall accuracy at most ``max_accuracy_drop`` points below the
    base's, no more mistakes on its own digit than the base makes, and an update that is not zero
    in every layer (such an adapter is the base itself, not a trained one; for a DoRA adapter, whose
    magnitude vector changes the outputs too, that needs ``base``: see :func:`_zero_update`). Any metric that is
    missing or not a finite number fails it too (every comparison below is False for NaN)."""
    m, d = adapter.metrics, adapter.digit
    acc, before = m.get("accuracy"), m.get("accuracy_before")
    wrong, wrong_before = m.get("wrong_per_digit"), m.get("wrong_per_digit_before")
    if not (
        all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (acc, before))
        and all(isinstance(w, list) and len(w) == 10 and all(isinstance(n, int) for n in w) for w in (wrong, wrong_before))
    ):
        return "quality gate: its test metrics are missing or malformed"
    drop = (before - acc) * 100  # type: ignore[operator]
    if not drop <= max_accuracy_drop:
        return (
            f"quality gate: test accuracy {before:.4f} -> {acc:.4f} ({-drop:+.2f} points), more than the allowed "
            f"{max_accuracy_drop:g} points below the base's (--max-accuracy-drop)"
        )
    if not wrong[d] <= wrong_before[d]:  # type: ignore[index]
        return f"quality gate: digit {d} wrong {wrong_before[d]} -> {wrong[d]} on the test set: an adapter for digit {d} must not make it worse"  # type: ignore[index]
    if adapter.folder is not None and _zero_update(Path(adapter.folder), base):
        return "quality gate: its update is zero in every layer: it changes nothing (the base's answers exactly), so it was not trained"
    return None


def _zero_update(folder: Path, base: nn.Module | None) -> bool:
    """Whether the adapter in ``folder`` changes no layer: ``B @ A`` zero in every layer (A or B all
    zeros) and, for DoRA, every magnitude vector equal to its base layer's row norms (with ``B A = 0``
    a DoRA layer scales row j by ``m_j / ||W_j||``); without ``base`` a DoRA adapter is never called zero."""
    from mnist_peft.io.adapters import read_adapter
    from mnist_peft.tuners.dora.magnitude import MAGNITUDE_KEY

    tensors = read_adapter(folder).state_dict
    pairs = [(k, k.replace("lora_A", "lora_B")) for k in tensors if "lora_A" in k]
    if any(bool(tensors[a].any()) and bool(tensors[b].any()) for a, b in pairs if b in tensors):
        return False
    magnitudes = {k.removesuffix("." + MAGNITUDE_KEY): m for k, m in tensors.items() if k.endswith(MAGNITUDE_KEY)}
    if magnitudes and base is None:
        return False
    return all(
        torch.equal(m, torch.linalg.vector_norm(base.get_submodule(layer).weight.detach(), dim=1).to(m.dtype))  # type: ignore[union-attr]
        for layer, m in magnitudes.items()
    )

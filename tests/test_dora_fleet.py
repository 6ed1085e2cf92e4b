"""DoRA in the fleet: the batched trainer runs each job's own adapter type (a DoRA job equals its solo
``train_adapter`` run bit for bit, beside a LoRA job in the same loop), the driver's check of a
returned adapter compares the type, and the quality gate's zero-update test knows DoRA's magnitudes.
``train-adapters --use-dora`` end to end is in ``tests/test_dora_plumbing.py``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import REPO

from mnist_peft.errors import FleetError
from mnist_peft.fleet.accept import check_returned, quality_gate
from mnist_peft.fleet.executors.base import FleetAdapter
from mnist_peft.io.adapters import AdapterFiles, save_adapter
from mnist_peft.model.mlp import base_fingerprint, load_base
from mnist_peft.training.batched import AdapterJob, train_batched
from mnist_peft.training.recipes import train_adapter
from mnist_peft.tuners.dora.config import DoraConfig
from mnist_peft.tuners.dora.magnitude import MAGNITUDE_KEY
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel

BASE = REPO / "adapters" / "base" / "v1"


def test_a_batched_dora_job_equals_its_solo_run_bit_for_bit_beside_a_lora_job(data_root: Path) -> None:
    """One loop, two types: the DoRA job's A, B and magnitude vectors, steps and test errors are those of
    ``train_adapter(..., use_dora=True)`` run alone (128 rows per job: the BLAS row invariance that the
    batched trainer's contract rests on, tests/test_fleet.py); its magnitudes moved from the base's row
    norms (they are trained, not carried as constants)."""
    base = load_base(BASE)
    dora = AdapterJob(9, "replay", (("eval_every", 5), ("seed", 0), ("steps", 10), ("use_dora", True)), name="dora-9")
    lora = AdapterJob(3, "replay", (("eval_every", 5), ("r", 2), ("seed", 1), ("steps", 10)), name="lora-3")
    batched = dict(zip(["lora-3", "dora-9"], train_batched(base, [lora, dora], data_dir=str(data_root)), strict=True))
    model, result = batched["dora-9"]
    solo_model, solo = train_adapter(base, 9, "replay", data_dir=str(data_root), **dict(dora.overrides))
    ours, theirs = model.lora_state_dict("default"), solo_model.lora_state_dict("default")
    assert isinstance(model.peft_config["default"], DoraConfig) and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (result.steps, result.after.wrong_per_digit) == (solo.steps, solo.after.wrong_per_digit)
    for layer in ("linear1", "linear2", "linear3"):
        norms = torch.linalg.vector_norm(getattr(base, layer).weight.detach(), dim=1)
        assert not torch.equal(ours[f"{layer}.{MAGNITUDE_KEY}"], norms), layer
    assert not any(MAGNITUDE_KEY in k for k in batched["lora-3"][0].lora_state_dict("default"))  # the LoRA job stays LoRA


def _adapter(tmp_path: Path, config: LoraConfig, *, digit: int = 9, name: str = "a") -> tuple[AdapterFiles, Path]:
    base = load_base(BASE)
    torch.manual_seed(0)
    model = LoraModel(copy.deepcopy(base), config)
    folder = save_adapter(model, tmp_path / name, metadata={"digit": str(digit), "steps": "10"})
    from mnist_peft.io.adapters import read_adapter

    return read_adapter(folder), folder


def test_the_driver_refuses_a_returned_adapter_of_another_type_than_the_jobs(tmp_path: Path) -> None:
    fingerprint = base_fingerprint(load_base(BASE))
    job = AdapterJob(9, "replay", (("steps", 10), ("use_dora", True)))
    lora_files, _ = _adapter(tmp_path, LoraConfig(r=4, lora_alpha=8), name="lora")
    with pytest.raises(FleetError, match="'adapter_type': 'lora'"):
        check_returned(lora_files, job, fingerprint)
    dora_files, _ = _adapter(tmp_path, DoraConfig(r=4, lora_alpha=8), name="dora")
    assert check_returned(dora_files, job, fingerprint) == 10
    with pytest.raises(FleetError, match="'adapter_type': 'dora'"):
        check_returned(dora_files, AdapterJob(9, "replay", (("steps", 10),)), fingerprint)


def test_the_quality_gate_calls_a_dora_adapter_zero_only_when_its_magnitudes_are_the_bases_row_norms(tmp_path: Path) -> None:
    """B = 0 (DoRA's init) and m = the base's row norms: the base itself, refused. B = 0 but one
    magnitude changed: row j is scaled by m_j/||W_j||, the outputs move, so it is kept."""
    base = load_base(BASE)
    metrics = {"accuracy": 0.98, "accuracy_before": 0.98, "wrong_per_digit": [1] * 10, "wrong_per_digit_before": [1] * 10}
    files, folder = _adapter(tmp_path, DoraConfig(r=4, lora_alpha=8), name="untrained")
    assert not any(bool(t.any()) for k, t in files.state_dict.items() if "lora_B" in k)
    untrained = FleetAdapter("a", 9, 0, 10, str(folder), metrics)
    assert "zero in every layer" in (quality_gate(untrained, base=base) or "")
    assert quality_gate(untrained) is None  # without the base a DoRA adapter's magnitudes cannot be judged: not called zero

    files.state_dict[f"linear2.{MAGNITUDE_KEY}"][7] *= 1.5
    from mnist_peft.io.adapters import write_adapter

    moved = write_adapter(files, tmp_path / "moved")
    assert quality_gate(FleetAdapter("a", 9, 0, 10, str(moved), metrics), base=base) is None

"""The demo keeps its time: its merge stage runs the stated, coarser grid with a bounded number of model
evaluations, whose numbers are those of the full study's points; and it shows its progress."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

from mnist_peft.experiments import merge_study as ms
from mnist_peft.experiments.merge_study import StudyConfig, merge_study, study_evaluations
from mnist_peft.merging.methods import DELTA_METHODS
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.training.loop import EvalResult, evaluate

DEMO_EVALUATIONS = 170
"""The most model evaluations the demo's merge stage may make: a quarter of the full study's 707."""


def _result(accuracy: float) -> EvalResult:
    return EvalResult(accuracy=accuracy, wrong_per_digit=[0] * 10, error_rate_per_digit=[0.0] * 10, n=1, confusion=[[0] * 10] * 10)


def test_the_demos_merge_stage_runs_the_stated_grid_within_its_evaluation_budget(monkeypatch, tmp_path: Path, data_root) -> None:
    """The demo's merge stage on the demo grid (stated in its report), the base's test result taken from
    the base stage; every evaluation counted (evaluations, merges, SVDs and the adapters' updates
    stubbed: only the grid, the count and the reuse are under test here)."""
    from mnist_peft.experiments import demo_stages
    from mnist_peft.experiments.demo_stages import DemoConfig, DemoRun, stage_merge

    counted: list[str] = []

    def val_loss(base, update, split):
        counted.append("val")
        return float(len(counted))  # later points never win: the first scale is chosen everywhere

    def evaluate_update(base, update, split):
        counted.append("test" if len(split) == 10_000 else "val")
        return _result(0.5)

    monkeypatch.setattr(ms, "_val_loss", val_loss)
    monkeypatch.setattr(ms, "_evaluate_update", evaluate_update)
    # one-number "deltas": merges, SVDs and the search's weighted sums cost nothing
    monkeypatch.setattr(ms, "_deltas", lambda adapters: {m: [torch.zeros(1, 1)] * len(adapters) for m in ("linear1", "linear2")})
    monkeypatch.setattr(ms, "_low_rank", lambda update, r: update)
    monkeypatch.setattr(ms, "merge_deltas", lambda ds, weights, **kw: ds[0])
    monkeypatch.setattr(demo_stages, "read_adapter", lambda folder: SimpleNamespace(path=None))
    base_eval = _result(0.9868).to_dict()
    run = DemoRun(DemoConfig(), tmp_path / "models", None, False, str(data_root), False, base_info={"eval": base_eval}, base=MnistMLP())
    run.folders = [tmp_path / f"digit-{d}" for d in range(10)]
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(
        ms._Evaluations, "_counted", lambda self: (setattr(self, "done", self.done + 1), seen.append((self.done, self.total)))
    )
    result = stage_merge(run)
    demo = StudyConfig.demo()
    assert result["config"]["densities"] == list(demo.densities) and result["config"]["scales"] == list(demo.scales)
    assert len(result["grid"]) == (1 + 4 * len(demo.densities)) * len(demo.scales)  # task arithmetic takes no density
    assert result["base"]["test"] == base_eval  # the base stage's, not evaluated again
    assert len(counted) == study_evaluations(demo, DELTA_METHODS, 10, base_test_known=True) <= DEMO_EVALUATIONS
    assert seen[-1] == (len(counted), len(counted))  # the progress total is the count made
    assert study_evaluations(StudyConfig(), DELTA_METHODS, 10) == 707  # the full grid stays merge-study's
    note = ms.grid_note(result)
    assert note is not None and "densities 0.01, 0.05, 0.3 and scales 0.1, 0.2, 0.5, 1, 2" in note
    assert ms.grid_note({"config": result["config"] | {"densities": [0.0025], "scales": [1.0]}}) is not None
    full = StudyConfig()
    assert ms.grid_note({"config": {"densities": list(full.densities), "scales": list(full.scales)}}) is None


@pytest.mark.slow
def test_a_coarser_grids_points_and_baselines_are_the_full_grids_own_numbers(data_root) -> None:
    """The demo's points are points of the full grid, computed the same way (the same floats), and
    the rows that do not depend on the grid are the same; a base test result handed in equals the one
    computed; each validation loss equals a direct forward pass of the updated model."""
    import torch.nn.functional as F

    from mnist_peft.io.adapters import read_adapter
    from mnist_peft.model.data import load_mnist, split_validation
    from mnist_peft.model.mlp import load_base
    from mnist_peft.registry.adapter_registry import AdapterRegistry

    registry = AdapterRegistry(REPO / "adapters")
    base = load_base(registry.path("base"))
    files = [read_adapter(registry.path(f"digit-{d}")) for d in range(10)]
    wide = StudyConfig(densities=(0.05, 0.3), scales=(0.5, 1.0), val_size=1000, search_steps=2)
    narrow = StudyConfig(densities=(0.3,), scales=(1.0,), val_size=1000, search_steps=2)
    calls: list[tuple[int, int]] = []
    full = merge_study(base, files, data_dir=str(data_root), config=wide, methods=("ties",), progress=lambda d, n: calls.append((d, n)))
    assert calls[-1] == (len(calls), study_evaluations(wide, ("ties",), 10))
    base_test = evaluate(base, load_mnist(train=False, data_dir=str(data_root))).to_dict()
    coarse = merge_study(base, files, data_dir=str(data_root), config=narrow, methods=("ties",), base_test=base_test)
    assert coarse["grid"] == [r for r in full["grid"] if r["density"] == 0.3 and r["scale"] == 1.0]
    for key in ("base", "best_single", "stack_tenth", "learned"):
        assert coarse[key] == full[key], key
    _, val = split_validation(load_mnist(train=True, data_dir=str(data_root)), wide.val_size, seed=wide.seed)
    deltas = ms._deltas(files)
    merged = {
        m: ms.merge_deltas(ds, [1.0] * 10, method="ties", density=0.3, generator=torch.Generator().manual_seed(0))
        for m, ds in deltas.items()
    }
    low = ms._low_rank(merged, wide.r)
    model = copy.deepcopy(base).eval()
    with torch.no_grad():
        for m, d in low.items():
            model.get_submodule(m).weight.add_(1.0 * d)
        direct = float(F.cross_entropy(model(val.x), val.y))
    assert coarse["grid"][0]["val_loss"] == direct

"""The executor seam is real: executors written here, against :class:`Executor` alone, run a real
fleet through ``run_fleet``, and what the driver keeps equals what the ``local`` executor makes.

One toy is registered by name in :data:`EXECUTORS` (as a new executor would be) and runs the jobs
one by one, last first, through the same per-job pieces the local executor uses; the other is
handed to ``run_fleet`` itself and is ``remote``: it tampers with what it hands back, and the
driver re-checks, re-scores and rewrites every folder, as it does for Ray workers.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from mnist_peft.errors import FleetError
from mnist_peft.fleet.executors.base import ExecutorResult, FleetAdapter, FleetWork, save_fleet_adapter
from mnist_peft.fleet.executors.table import EXECUTORS
from mnist_peft.fleet.jobs import fleet_jobs
from mnist_peft.fleet.run import run_fleet
from mnist_peft.io.adapters import read_adapter, write_adapter
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.training.batched import AdapterJob, train_batched

BASE = REPO / "adapters" / "base" / "v1"
WEIGHTS = "adapter_model.safetensors"


class ReversedExecutor:
    """Each job alone, last job first, in this process: ``train_batched`` on one job, then the
    folder written as the local executor writes it. Counts the jobs it ran."""

    name = "reversed"
    remote = False

    def __init__(self) -> None:
        self.ran: list[str] = []

    def run(self, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
        done = {}
        for job in reversed(jobs):
            self.ran.append(job.name)
            [(model, result)] = train_batched(work.base, [job], data_dir=work.data_dir)
            done[job.name] = save_fleet_adapter(model, result, job, work.base_ref, str(Path(work.staging) / job.name))
        return ExecutorResult([done[j.name] for j in jobs], {})


class ForgingRemoteExecutor(ReversedExecutor):
    """As above, but ``remote``: its folders are untrusted. It forges the first job's model card
    and claims a wrong digit for the second, which the driver must refuse."""

    name = "forging"
    remote = True

    def run(self, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
        out = super().run(jobs, work)
        first, second = (Path(a.folder) for a in out.trained)
        (first / "README.md").write_text("totally 100% accurate, visit evil.example")
        files = read_adapter(second)
        files.metadata["digit"] = str((jobs[1].digit + 1) % 10)
        write_adapter(files, second.parent / "forged", model_card=(second / "README.md").read_text())
        for name in ("adapter_config.json", WEIGHTS):
            (second / name).write_bytes((second.parent / "forged" / name).read_bytes())
        return out


def _weights_equal(a: Path, b: Path) -> bool:
    ours, theirs = load_file(a / WEIGHTS), load_file(b / WEIGHTS)
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.fixture()
def registry_with_base(tmp_path: Path) -> AdapterRegistry:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("base", BASE)
    return reg


@pytest.fixture(scope="module")
def local_fleet(tmp_path_factory: pytest.TempPathFactory, data_root: Path):
    """The ``local`` executor's fleet: the reference the toys are compared with."""
    tmp = tmp_path_factory.mktemp("local")
    reg = AdapterRegistry(tmp / "reg")
    reg.add("base", BASE)
    jobs = fleet_jobs([2, 5], steps=20, eval_every=10)
    return jobs, run_fleet("base", jobs, root=str(reg.root), out=str(tmp / "out"), data_dir=str(data_root), quiet=True)


def test_an_executor_registered_by_name_runs_a_fleet_that_equals_the_local_one(
    local_fleet, registry_with_base: AdapterRegistry, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs, local = local_fleet
    toy = ReversedExecutor()
    monkeypatch.setitem(EXECUTORS, toy.name, toy)
    res = run_fleet(
        "base", jobs, root=str(registry_with_base.root), executor="reversed", register=True, data_dir=str(data_root), quiet=True
    )
    assert toy.ran == ["digit-5", "digit-2"]  # its own order, one call per job
    assert res.executor == "reversed" and res.failed == {}
    assert res.registered == [{"name": "digit-2", "version": 1}, {"name": "digit-5", "version": 1}]
    assert all(a.metrics["accuracy"] != a.metrics["accuracy_before"] for a in res.trained)  # the adapters changed the model
    for ours, theirs in zip(res.trained, local.trained, strict=True):
        folder = registry_with_base.path(ours.name)
        assert _weights_equal(folder, Path(theirs.folder)), ours.name
        assert (ours.steps, ours.metrics) == (theirs.steps, theirs.metrics)
        assert registry_with_base.get(ours.name).metrics == ours.metrics
    assert registry_with_base.verify() == []


def test_a_remote_executors_folders_are_checked_and_rewritten_by_the_driver(
    local_fleet, registry_with_base: AdapterRegistry, data_root: Path
) -> None:
    jobs, local = local_fleet
    toy = ForgingRemoteExecutor()
    res = run_fleet(
        "base", jobs, root=str(registry_with_base.root), executor=toy, register=True, allow_partial=True, data_dir=str(data_root),
        quiet=True,
    )  # fmt: skip
    assert toy.ran == ["digit-5", "digit-2"] and res.executor == "forging"
    assert list(res.failed) == ["digit-5"] and "'digit'" in res.failed["digit-5"]  # the wrong digit is refused
    assert [e["name"] for e in res.registered] == ["digit-2"]
    folder = registry_with_base.path("digit-2")
    assert _weights_equal(folder, Path(local.trained[0].folder))
    assert "evil.example" not in (folder / "README.md").read_text()  # the driver's card, with the driver's numbers
    assert (folder / "README.md").read_bytes() == (Path(local.trained[0].folder) / "README.md").read_bytes()
    assert res.trained[0].metrics == local.trained[0].metrics


def test_an_unknown_executor_name_is_refused_before_any_work(tmp_path: Path) -> None:
    from mnist_peft.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="choose from local, ray"):
        run_fleet(str(BASE), fleet_jobs([1]), root=str(tmp_path / "reg"), register=True, executor="reversed")
    assert not (tmp_path / "reg").exists()


class HandBack:
    """A ``remote`` toy that trains nothing: it hands back what ``plan(jobs, work)`` returns."""

    name = "hand-back"
    remote = True

    def __init__(self, plan) -> None:
        self.plan = plan

    def run(self, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
        return self.plan(jobs, work)


def test_the_driver_gates_a_remote_executors_folders_before_reading_them(
    local_fleet, registry_with_base: AdapterRegistry, data_root: Path, tmp_path: Path
) -> None:
    jobs, local = local_fleet
    good = {a.name: Path(a.folder) for a in local.trained}  # real adapters of these very jobs

    def plan(jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
        outside = tmp_path / "elsewhere" / "digit-2"  # a folder the driver did not hand out
        shutil.copytree(good["digit-2"], outside)
        extra = Path(work.staging) / "digit-5"
        shutil.copytree(good["digit-5"], extra)
        (extra / "notes.txt").write_text("one file too many")
        return ExecutorResult([FleetAdapter("digit-2", 2, 0, 20, str(outside), {}), FleetAdapter("digit-5", 5, 0, 20, str(extra), {})], {})

    with pytest.raises(FleetError, match="no job of the fleet succeeded") as err:
        run_fleet("base", jobs, root=str(registry_with_base.root), executor=HandBack(plan), register=True, allow_partial=True,
                  data_dir=str(data_root), quiet=True)  # fmt: skip
    assert "outside the fleet's staging folder" in err.value.failed["digit-2"]
    assert "expected exactly" in err.value.failed["digit-5"]
    assert [e.name for e in registry_with_base.list()] == ["base"]  # nothing registered


def test_a_job_the_executor_lost_fails_by_name_and_a_stray_result_is_refused(
    local_fleet, registry_with_base: AdapterRegistry, data_root: Path
) -> None:
    jobs, _ = local_fleet
    lost = HandBack(lambda jobs, work: ExecutorResult([], {"digit-2": "worker died"}))
    with pytest.raises(FleetError) as err:
        run_fleet("base", jobs, root=str(registry_with_base.root), executor=lost, register=True, data_dir=str(data_root), quiet=True)
    assert err.value.failed == {
        "digit-2": "worker died",
        "digit-5": "executor 'hand-back' handed back neither an adapter nor an error for it",
    }
    stray = HandBack(lambda jobs, work: ExecutorResult([], {"digit-2": "x", "digit-5": "y", "digit-7": "z"}))
    with pytest.raises(FleetError, match="a bug in the executor") as err:
        run_fleet("base", jobs, root=str(registry_with_base.root), executor=stray, register=True, data_dir=str(data_root), quiet=True)
    assert err.value.failed == {"digit-7": "not a job of this fleet"}
    assert [e.name for e in registry_with_base.list()] == ["base"]

"""What a fleet keeps and how long it waits: every result passes a quality gate before it is
registered (its accuracy, its own digit, an update that does something), the whole fleet has a
deadline (``--timeout``), and the batched trainer gives the caller's RNG back whatever happens.

The results come from ``remote`` toy executors written here against the :class:`Executor` seam,
which hand back real adapter folders of the repo's own (``adapters/``), forged as a worker could.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli
from safetensors.torch import save_file

from mnist_peft.errors import FleetError, InvalidArgumentError
from mnist_peft.fleet.executors.base import ExecutorResult, FleetAdapter, FleetWork
from mnist_peft.fleet.jobs import fleet_jobs
from mnist_peft.fleet.run import run_fleet
from mnist_peft.io.adapters import ADAPTER_WEIGHTS_NAME, KEY_PREFIX, read_adapter
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.training.batched import AdapterJob, train_batched

BASE = REPO / "adapters" / "base" / "v1"


class Forging:
    """A ``remote`` toy: for each job it hands back the repo's adapter of digit ``source(job)``,
    its tensors changed by ``edit`` and its metadata claiming the job's digit (so that every
    check of what the adapter *says* passes: only its numbers can give it away)."""

    name = "forging"
    remote = True

    def __init__(self, source: Callable[[AdapterJob], int], edit: Callable[[dict[str, torch.Tensor]], None] = lambda sd: None) -> None:
        self.source, self.edit = source, edit

    def run(self, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
        out = []
        for job in jobs:
            source = REPO / "adapters" / f"digit-{self.source(job)}" / "v1"
            files = read_adapter(source)
            files.metadata["digit"] = str(job.digit)
            self.edit(files.state_dict)
            # a worker writes what it likes: not through write_adapter, whose gate refuses what the driver must catch
            folder = Path(work.staging) / job.name
            folder.mkdir(parents=True)
            for name in ("adapter_config.json", "README.md"):
                shutil.copyfile(source / name, folder / name)
            save_file(
                {KEY_PREFIX + k: v.contiguous() for k, v in files.state_dict.items()},
                folder / ADAPTER_WEIGHTS_NAME,
                metadata={"format": "pt", **files.metadata},
            )
            out.append(FleetAdapter(job.name, job.digit, job.seed, 0, str(folder), {}))
        return ExecutorResult(out, {})


@pytest.fixture()
def registry(tmp_path: Path) -> AdapterRegistry:
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("base", BASE)
    return reg


def _fleet(registry: AdapterRegistry, data_root: Path, executor, digits=(9,), **kwargs):
    return run_fleet(
        "base", fleet_jobs(list(digits)), root=str(registry.root), executor=executor, register=True, data_dir=str(data_root), quiet=True,
        **kwargs,
    )  # fmt: skip


def test_an_honest_result_passes_the_gate_and_is_registered(registry: AdapterRegistry, data_root: Path) -> None:
    """The control: the repo's own digit-9 adapter, handed back for digit 9, is kept."""
    res = _fleet(registry, data_root, Forging(lambda job: job.digit))
    assert res.failed == {} and res.registered == [{"name": "digit-9", "version": 1}]
    m = res.trained[0].metrics
    assert m["wrong_per_digit"][9] < m["wrong_per_digit_before"][9]  # 17 -> 10 on the repo's base


def test_another_digits_weights_labelled_as_this_digit_are_refused(registry: AdapterRegistry, data_root: Path) -> None:
    """Digit 3's adapter handed back as digit 9's: it costs little accuracy (0.14 points) but makes
    digit 9 worse (17 -> 20 wrong), so the gate refuses it, with the numbers."""
    with pytest.raises(FleetError, match="no job of the fleet succeeded") as err:
        _fleet(registry, data_root, Forging(lambda job: 3))
    assert err.value.failed["digit-9"] == (
        "quality gate: digit 9 wrong 17 -> 20 on the test set: an adapter for digit 9 must not make it worse"
    )
    assert [e.name for e in registry.list()] == ["base"]


def test_an_adapter_that_changes_nothing_is_refused(registry: AdapterRegistry, data_root: Path) -> None:
    """All zeros: the base's answers exactly. "Not worse" holds, but nothing was trained."""

    def zeros(sd: dict[str, torch.Tensor]) -> None:
        for t in sd.values():
            t.zero_()

    with pytest.raises(FleetError) as err:
        _fleet(registry, data_root, Forging(lambda job: job.digit, zeros))
    assert "update is zero in every layer" in err.value.failed["digit-9"]
    assert [e.name for e in registry.list()] == ["base"]


def test_a_result_that_costs_accuracy_is_refused_with_its_numbers(registry: AdapterRegistry, data_root: Path) -> None:
    """A finite adapter scaled until it hurts: below the allowed drop it is a failed job that says
    by how much; a caller who allows that drop keeps it."""

    def louder(sd: dict[str, torch.Tensor]) -> None:
        for k in sd:
            if "lora_B" in k:
                sd[k].mul_(8.0)

    with pytest.raises(FleetError) as err:
        _fleet(registry, data_root, Forging(lambda job: job.digit, louder))
    reason = err.value.failed["digit-9"]
    assert reason.startswith("quality gate: test accuracy 0.9868 -> 0.") and "points below the base's" in reason, reason
    drop = float(reason.split("(")[1].split(" points")[0])
    assert drop < -0.5  # the default bound, and the message's number is the real cost
    kept = _fleet(registry, data_root, Forging(lambda job: job.digit, louder), max_accuracy_drop=-drop + 0.01)
    assert kept.failed == {} and [e["name"] for e in kept.registered] == ["digit-9"]


def test_huge_finite_weights_are_never_registered(registry: AdapterRegistry, data_root: Path) -> None:
    """1e18 everywhere: finite, so the loader's finiteness check alone lets it through; the probe
    gate of the loader (where it exists) or the quality gate (accuracy ~0.1) refuses it."""

    def huge(sd: dict[str, torch.Tensor]) -> None:
        for t in sd.values():
            t.fill_(1e18)

    with pytest.raises(FleetError) as err:
        _fleet(registry, data_root, Forging(lambda job: job.digit, huge), digits=(3, 9))
    assert set(err.value.failed) == {"digit-3", "digit-9"}
    for reason in err.value.failed.values():
        assert reason.startswith(("quality gate: test accuracy", "returned adapter refused")), reason
    assert [e.name for e in registry.list()] == ["base"]


@pytest.mark.parametrize(("flag", "value", "words"), [("--max-accuracy-drop", "nan", "max_accuracy_drop"),
                                                      ("--max-accuracy-drop", "-1", "from 0 to 100"),
                                                      ("--timeout", "0", "positive"), ("--timeout", "inf", "timeout")])  # fmt: skip
def test_bad_limits_are_refused_before_any_work(tmp_path: Path, flag: str, value: str, words: str) -> None:
    proc = run_cli("train-adapters", "--base", str(BASE), "--digits", "3", "--register", "d", flag, value, "--root", str(tmp_path / "reg"))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1 and words in proc.stderr, proc.stderr
    assert not (tmp_path / "reg").exists()


# ----------------------------------------------------------------------------- the deadline
class Hanging:
    """A ``remote`` toy waiting for a worker that never answers, and not honouring the deadline
    itself (it never looks at ``work.deadline``): the driver must stop waiting on its own."""

    name = "hanging"
    remote = True

    def __init__(self) -> None:
        self.release = threading.Event()

    def run(self, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
        self.release.wait()  # the hung worker: released only when the test ends
        return ExecutorResult([], {j.name: "released" for j in jobs})


def test_a_hung_executor_fails_every_job_by_name_at_the_deadline(
    registry: AdapterRegistry, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mnist_peft.fleet.run as run

    monkeypatch.setattr(run, "EXECUTOR_GRACE_S", 0.5)
    toy = Hanging()
    start = time.monotonic()
    try:
        with pytest.raises(FleetError, match="no job of the fleet succeeded") as err:
            _fleet(registry, data_root, toy, digits=(3, 9), timeout=1.0)
    finally:
        toy.release.set()
    assert time.monotonic() - start < 60  # it did not wait for the worker
    assert list(err.value.failed) == ["digit-3", "digit-9"]
    for reason in err.value.failed.values():
        assert reason.startswith("did not finish within the fleet's --timeout of 1 s; executor 'hanging' had not handed it back"), reason
    assert [e.name for e in registry.list()] == ["base"]


def test_the_local_executor_stops_at_the_deadline(registry: AdapterRegistry, data_root: Path) -> None:
    """The local batched run checks the deadline after every step: a fleet that needs minutes
    ends at the deadline, every job failed by name, nothing registered."""
    start = time.monotonic()
    with pytest.raises(FleetError) as err:
        run_fleet(
            "base", fleet_jobs([2, 5], steps=100_000), root=str(registry.root), register=True, data_dir=str(data_root), quiet=True,
            timeout=3.0,
        )  # fmt: skip
    assert time.monotonic() - start < 60
    assert list(err.value.failed) == ["digit-2", "digit-5"]
    assert all(
        "did not finish within the fleet's --timeout of 3 s; the batched run was stopped at step" in e for e in err.value.failed.values()
    )
    assert [e.name for e in registry.list()] == ["base"]


@pytest.mark.slow  # starts a real local Ray
def test_a_hung_ray_worker_is_cancelled_at_the_deadline_and_the_others_are_kept(registry: AdapterRegistry, data_root: Path) -> None:
    """A real Ray whose worker for digit-5 hangs (the ``hang`` fault hook): at the deadline the
    driver stops waiting, cancels the task and fails that job by name; digit-2 is kept."""
    start = time.monotonic()
    res = run_fleet(
        "base", fleet_jobs([2, 5], steps=5), root=str(registry.root), executor="ray", register=True, allow_partial=True,
        data_dir=str(data_root), quiet=True, timeout=60, _fault=("hang", "digit-5"),
    )  # fmt: skip  # 60 s: Ray's start and digit-2's 5 steps take ~17 s on this VM alone
    assert time.monotonic() - start < 60 + 60  # the deadline, plus Ray's shutdown
    assert list(res.failed) == ["digit-5"] and "its Ray task was cancelled" in res.failed["digit-5"]
    assert [e["name"] for e in res.registered] == ["digit-2"]


# ----------------------------------------------------------------------------- the caller's RNG
def test_a_failing_job_setup_leaves_the_global_rng_as_it_was(data_root: Path) -> None:
    """The second job's setup fails (a validation split as large as the training set) after the
    first one's reseeded the global RNG: the caller's RNG state comes back all the same."""
    from mnist_peft.model.mlp import load_base

    base = load_base(BASE)
    torch.manual_seed(1234)
    torch.rand(3)  # a state no job's seed gives
    before = torch.get_rng_state()
    jobs = [AdapterJob(1, overrides=(("steps", 2),)), AdapterJob(2, overrides=(("val_size", 60_000),))]
    with pytest.raises(InvalidArgumentError, match="validation size"):
        train_batched(base, jobs, data_dir=str(data_root))
    assert torch.equal(torch.get_rng_state(), before)


def test_limits_are_checked_by_the_library_too(registry: AdapterRegistry) -> None:
    for kwargs, words in (({"timeout": float("nan")}, "timeout"), ({"max_accuracy_drop": 101}, "from 0 to 100")):
        with pytest.raises(InvalidArgumentError, match=words):
            run_fleet("base", fleet_jobs([3]), root=str(registry.root), register=True, **kwargs)

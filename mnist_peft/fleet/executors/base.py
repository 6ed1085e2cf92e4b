"""The executor seam: the one interface that runs a fleet's jobs, what it is handed and what it hands back.

An executor gets the jobs and a :class:`FleetWork` (the checked base, where a worker finds it, the
staging folder, the run's options) and returns an :class:`ExecutorResult`: one PEFT adapter folder
per trained job under ``work.staging`` (:func:`save_fleet_adapter` writes one) and an error per
failed job. :func:`~mnist_peft.fleet.run.run_fleet` does everything else: it checks the jobs, pins
the base, re-checks what a ``remote`` executor returns, writes ``--out``, registers and pushes.

This module imports no torch, so that the name -> executor table (:mod:`.table`) can feed the
``mnist-peft`` parser's ``--executor`` choices without slowing the commands that need no tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from mnist_peft.errors import FleetError
from mnist_peft.fleet.progress import FleetProgress

if TYPE_CHECKING:
    from torch import nn

    from mnist_peft.training.batched import AdapterJob
    from mnist_peft.training.recipes import AdapterTrainResult
    from mnist_peft.tuners.lora.model import LoraModel

__all__ = [
    "ADAPTER_FILES",
    "MAX_RETURNED_BYTES",
    "Executor",
    "ExecutorResult",
    "FleetAdapter",
    "FleetWork",
    "check_returned_folder",
    "save_fleet_adapter",
]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")
"""The files a fleet job hands back (a PEFT adapter folder); nothing else is accepted from a worker."""

MAX_RETURNED_BYTES = 64 << 20
"""The most a worker may hand back for one adapter (an r=4 adapter is ~30 kB)."""


def check_returned_folder(name: str, folder: str | None, staging: str) -> Path:
    """The one gate on a ``remote`` executor's folder, before the driver reads a byte of it: a real
    folder under ``staging`` (no link out of it), holding exactly :data:`ADAPTER_FILES` as regular
    files, :data:`MAX_RETURNED_BYTES` at most in all. Returns the folder.

    Raises:
        FleetError: what is wrong, with ``failed={name: reason}`` (the job fails, the others go on).
    """
    path = Path(folder) if folder else None
    if path is None or path.is_symlink() or not path.is_dir() or not path.resolve().is_relative_to(Path(staging).resolve()):
        raise FleetError(f"job {name} was handed back outside the fleet's staging folder: {folder!r}", failed={name: "outside staging"})
    entries = {p.name: p for p in path.iterdir()}
    if sorted(entries) != sorted(ADAPTER_FILES) or any(p.is_symlink() or not p.is_file() for p in entries.values()):
        raise FleetError(
            f"job {name} handed back {sorted(entries)[:10]}; expected exactly {list(ADAPTER_FILES)} as regular files",
            failed={name: "bad files"},
        )
    if sum(p.stat().st_size for p in entries.values()) > MAX_RETURNED_BYTES:
        raise FleetError(f"job {name} handed back more than {MAX_RETURNED_BYTES >> 20} MB", failed={name: "too large"})
    return path


@dataclass
class FleetAdapter:
    """One trained adapter of a fleet, saved in a folder of the driver's."""

    name: str
    digit: int
    seed: int
    steps: int
    folder: str | None
    """Where it is: a folder under ``out``, None when the fleet was only registered."""
    metrics: dict[str, object]


class ExecutorResult(NamedTuple):
    """What an executor hands back: the adapters trained (in job order) and each failed job's error."""

    trained: list[FleetAdapter]
    failed: dict[str, str]


@dataclass(frozen=True)
class FleetWork:
    """Everything an executor needs besides the jobs; one run's, built by :func:`~mnist_peft.fleet.run.run_fleet`."""

    base: nn.Module
    """The driver's base, already checked (a plain ``MnistMLP``); an in-process executor trains on it."""
    base_ref: str
    """What each adapter's config and card name as its base."""
    source: str
    """Where a worker process loads the base from: its own folder (absolute) or its Hub repo id."""
    revision: str | None
    """The Hub commit of a Hub base that every worker must read (None otherwise)."""
    staging: str
    """The driver's temporary folder; executors write the adapter folders under it."""
    data_dir: str | None
    """The MNIST data root the caller gave (None: the default)."""
    quiet: bool = False
    tty: bool = False
    """Whether stderr is a terminal (a live bar) or not (a status line now and then)."""
    retries: int = 2
    """How many times a remote executor re-runs a job whose worker died or which raised unexpectedly."""
    address: str | None = None
    """The cluster a remote executor connects to (None: its default)."""
    fault: tuple[str, ...] | None = None
    """A test hook for remote executors (see :func:`mnist_peft.fleet.executors.ray._train_one`)."""
    timeout: float | None = None
    """The fleet's ``--timeout`` in seconds (None: no deadline)."""
    deadline: float | None = None
    """When the jobs must have ended, on :func:`time.monotonic`'s clock (None: no deadline). An
    executor stops there and fails every job it has not finished with :meth:`timed_out`; the
    driver stops waiting for one that does not."""

    def remaining(self) -> float | None:
        """Seconds left before :attr:`deadline` (0 once it passed; None: no deadline)."""
        import time

        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def timed_out(self, what: str = "the job was cancelled") -> str:
        """The error of a job that had not ended when the fleet's deadline came."""
        return f"did not finish within the fleet's --timeout of {self.timeout:g} s; {what} (raise --timeout, or find why it hangs)"

    def progress(self, jobs: Sequence[AdapterJob], *, total: int, unit: str) -> FleetProgress:
        """The fleet's progress display, counting ``total`` ``unit``\\ s (steps, jobs)."""
        return FleetProgress(jobs, unit_total=total, unit=unit, tty=self.tty, quiet=self.quiet)


class Executor(Protocol):
    """Runs a fleet's jobs. A new executor is one class with these three members, added to
    :data:`~mnist_peft.fleet.executors.table.EXECUTORS` (or passed to ``run_fleet`` itself)."""

    name: str
    """What ``--executor`` and :attr:`FleetResult.executor <mnist_peft.fleet.run.FleetResult>` call it."""
    remote: bool
    """True when jobs run outside this process: the driver then pins a Hub base to one commit, hands
    workers ``work.source``, and reads every returned folder as untrusted (it checks the tensors,
    re-scores and rewrites each adapter). False: the folders are trusted as written."""

    def run(self, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
        """Train every job; a folder under ``work.staging`` per trained one, an error per failed one.

        An executor may also say ``stops_at_deadline = True``: it then ends at ``work.deadline``
        itself (each job not finished failed with ``work.timed_out(...)``) and runs in the driver's
        thread; without it, the driver runs it in a thread and stops waiting shortly after."""
        ...


def save_fleet_adapter(model: LoraModel, result: AdapterTrainResult, job: AdapterJob, base_ref: str, folder: str) -> FleetAdapter:
    """Write one trained adapter as ``train-adapter`` writes it (metadata, model card), with its seed."""
    from mnist_peft.training.recipes import save_trained_adapter

    save_trained_adapter(model, result, folder, base_model=base_ref, extra={"seed": str(job.seed)})
    return FleetAdapter(job.name, job.digit, job.seed, result.steps, str(folder), result.metrics())

"""The ``local`` executor: every job in one batched loop in this process (:func:`~mnist_peft.training.batched.train_batched`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .base import ExecutorResult, FleetWork, save_fleet_adapter

if TYPE_CHECKING:
    from mnist_peft.training.batched import AdapterJob

__all__ = ["LocalExecutor"]


class _DeadlinePassed(Exception):
    """Raised from the progress callback to end the batched run at the fleet's deadline."""


@dataclass(frozen=True)
class LocalExecutor:
    """All jobs together here: one base GEMM per layer for all of them; each adapter equals its solo run."""

    name: str = "local"
    remote: bool = False
    stops_at_deadline: bool = True
    """It ends the run at ``work.deadline`` itself (see :class:`~.base.Executor`)."""

    def run(self, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
        """Train ``jobs`` on ``work.base`` in one loop; the progress bar counts steps."""
        from mnist_peft.training.batched import train_batched  # torch: only when a fleet runs

        totals = [j.resolved()[1].steps for j in jobs]
        bar = work.progress(jobs, total=sum(totals), unit="step")

        def report(status: list[dict[str, object]]) -> None:
            done = sum(int(s["total"]) if s["state"] != "running" else int(s["step"]) for s in status)
            bar.update(status, done)
            if work.remaining() == 0:  # checked after every step: the batched run ends at the deadline
                raise _DeadlinePassed(done)

        try:
            out = train_batched(work.base, jobs, data_dir=work.data_dir, progress=report)
        except _DeadlinePassed as passed:  # the jobs train as one batch: none of them has ended
            what = f"the batched run was stopped at step {passed.args[0]} of {sum(totals)} (all jobs together)"
            return ExecutorResult([], {j.name: work.timed_out(what) for j in jobs})
        finally:
            bar.close()
        trained = [
            save_fleet_adapter(m, r, j, work.base_ref, str(Path(work.staging) / j.name)) for j, (m, r) in zip(jobs, out, strict=True)
        ]
        return ExecutorResult(trained, {})

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


@dataclass(frozen=True)
class LocalExecutor:
    """All jobs together here: one base GEMM per layer for all of them; each adapter equals its solo run."""

    name: str = "local"
    remote: bool = False

    def run(self, jobs: Sequence[AdapterJob], work: FleetWork) -> ExecutorResult:
        """Train ``jobs`` on ``work.base`` in one loop; the progress bar counts steps."""
        from mnist_peft.training.batched import train_batched  # torch: only when a fleet runs

        totals = [j.resolved()[1].steps for j in jobs]
        bar = work.progress(jobs, total=sum(totals), unit="step")

        def report(status: list[dict[str, object]]) -> None:
            done = sum(int(s["total"]) if s["state"] != "running" else int(s["step"]) for s in status)
            bar.update(status, done)

        try:
            out = train_batched(work.base, jobs, data_dir=work.data_dir, progress=report)
        finally:
            bar.close()
        trained = [
            save_fleet_adapter(m, r, j, work.base_ref, str(Path(work.staging) / j.name)) for j, (m, r) in zip(jobs, out, strict=True)
        ]
        return ExecutorResult(trained, {})

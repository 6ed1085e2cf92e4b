"""What a fleet shows while it runs: one progress bar on a terminal, a status line now and then otherwise."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mnist_peft.training.batched import AdapterJob

__all__ = ["FleetProgress"]


class FleetProgress:
    """One progress bar for the fleet with per-job status on a terminal; otherwise a line on stderr
    now and then (every ``every`` seconds, and when a job ends)."""

    def __init__(self, jobs: Sequence[AdapterJob], *, unit_total: int, unit: str, tty: bool, quiet: bool, every: float = 15.0) -> None:
        import sys

        from tqdm.auto import tqdm

        self.names = [j.name for j in jobs]
        self.quiet, self.tty, self.every = quiet, tty, every
        self.bar = tqdm(total=unit_total, desc="fleet", unit=unit, leave=False, disable=quiet or not tty)
        self.last_line, self.ended = time.monotonic(), set()
        self.stream = sys.stderr
        self.done = 0

    def update(self, status: list[dict[str, object]], done_units: int) -> None:
        """Show ``status`` (one dict per job: ``name``, ``state``, maybe ``step``/``total``); ``done_units`` so far."""
        if self.quiet:
            return
        self.bar.update(done_units - self.done)
        self.done = done_units
        ended = {str(s["name"]) for s in status if s["state"] not in ("running", "pending")}
        if self.tty:
            self.bar.set_postfix_str(" ".join(f"{s['name']}:{_short(s)}" for s in status), refresh=False)
            return
        if ended - self.ended or time.monotonic() - self.last_line >= self.every:
            self.last_line = time.monotonic()
            print(
                f"fleet: {len(ended)}/{len(status)} jobs ended; " + ", ".join(f"{s['name']} {_short(s)}" for s in status), file=self.stream
            )
        self.ended = ended

    def close(self) -> None:
        self.bar.close()


def _short(s: dict[str, object]) -> str:
    state = str(s["state"])
    if state == "running" and "total" in s:
        return f"{s['step']}/{s['total']}"
    return state

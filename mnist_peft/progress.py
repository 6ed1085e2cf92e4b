"""Progress for long work, for a person at a terminal and for a log alike.

On a terminal, a tqdm bar. When output is a pipe or a file (CI, ``nohup``, a notebook's captured
stream), a bar would either vanish or fill the log with carriage returns, and silence looks like a
hang: so a plain line goes to stderr every few seconds, with the count and an estimate of the time
left (``[merge] 12/40 points, 9.1 s, ~21 s left``), and one when the work ends. ``--quiet`` turns
both off. The seconds between two lines are ``$MNIST_PEFT_PROGRESS_EVERY`` when it is set (e.g. ``1``
for a log that is watched closely, or a test), else :data:`LINE_EVERY`.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import IO, Any

from mnist_peft.errors import InvalidArgumentError

__all__ = ["ENV_EVERY", "LINE_EVERY", "Progress", "format_seconds", "line_every"]

LINE_EVERY = 5.0  # seconds between two plain lines when output is not a terminal
ENV_EVERY = "MNIST_PEFT_PROGRESS_EVERY"  # overrides LINE_EVERY where it is set


def line_every() -> float:
    """Seconds between two plain lines: ``$MNIST_PEFT_PROGRESS_EVERY`` if set, else :data:`LINE_EVERY`.

    Raises:
        InvalidArgumentError: the variable is set to something other than a number of seconds >= 0.
    """
    text = os.environ.get(ENV_EVERY, "").strip()
    if not text:
        return LINE_EVERY
    try:
        value = float(text) if len(text) <= 40 else math.nan
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise InvalidArgumentError(f"${ENV_EVERY} must be a number of seconds >= 0, got {text[:40]!r}: unset it or give e.g. 5")
    return value


def format_seconds(seconds: float) -> str:
    """``42 s`` below two minutes, ``3 min 05 s`` above."""
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s"


class Progress:
    """A progress display over ``total`` units of work, used as a context manager or closed by hand.

    Args:
        total: units of work expected (steps, points, jobs); ``None`` when unknown (no estimate).
        desc: a short label, shown as ``[desc]`` in lines and as the bar's description.
        enabled: ``False`` shows nothing (``--quiet``).
        unit: what a unit is called in lines (``step``, ``point``...).
        every: seconds between plain lines when the stream is not a terminal (default: :func:`line_every`).
        stream: where to write (default ``sys.stderr``); a bar only when it is a terminal.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        enabled: bool = True,
        unit: str = "it",
        every: float | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every = line_every() if every is None else every
        self.stream = stream if stream is not None else sys.stderr
        self.n = 0
        self.shown = 0  # the count the last plain line showed
        self.postfix = ""
        self.start = self.last_line = time.monotonic()
        self.bar: Any = None
        self.lines = False
        if not enabled:
            return
        if _isatty(self.stream):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream)
        else:
            self.lines = True

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.lines and time.monotonic() - self.last_line >= self.every:
            self._line()

    def set_postfix(self, **values: object) -> None:
        """Extra values shown after the count (e.g. ``loss=0.0312``)."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        """End the display: a bar is cleared; a log that got lines gets the final count, once."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.lines and self.last_line != self.start and self.n != self.shown:
            self._line(final=True)
        self.lines = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _line(self, *, final: bool = False) -> None:
        now = time.monotonic()
        self.last_line, self.shown = now, self.n
        elapsed = now - self.start
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        text = f"[{self.desc}] {count} {self.unit}s, {format_seconds(elapsed)}"
        if not final and self.total and 0 < self.n < self.total:
            text += f", ~{format_seconds(elapsed * (self.total - self.n) / self.n)} left"
        if self.postfix:
            text += f" ({self.postfix})"
        print(text, file=self.stream, flush=True)


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or a fake stream
        return False

"""Long work shows progress to a person and to a log: a bar on a terminal, a plain line with an
estimate now and then otherwise, nothing with --quiet (mnist_peft/progress.py)."""

from __future__ import annotations

import io
import time

from mnist_peft.progress import Progress, format_seconds


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_pipe_gets_a_line_with_an_estimate_and_a_last_line():
    out = io.StringIO()
    with Progress(10, "merge", unit="point", every=0.0, stream=out) as p:
        for _ in range(4):
            time.sleep(0.01)
            p.update()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[merge] 1/10 points, ") and lines[0].endswith(" left")
    assert lines[3].startswith("[merge] 4/10 points, ") and "~" in lines[3]
    assert len(lines) == 4  # the last update showed the final count: close() does not repeat it


def test_a_pipe_gets_the_final_count_when_the_last_line_was_older():
    out = io.StringIO()
    with Progress(10, "merge", unit="point", every=0.0, stream=out) as p:
        p.update()
        p.every = 3600.0
        p.update(9)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].startswith("[merge] 10/10 points, ") and "left" not in lines[-1]


def test_a_pipe_gets_no_more_than_a_line_per_interval():
    out = io.StringIO()
    with Progress(1000, "train", unit="step", every=3600.0, stream=out) as p:
        for _ in range(1000):
            p.update()
    assert out.getvalue() == ""  # fast work says nothing: no line was due, so no closing line either


def test_quiet_shows_nothing_even_on_a_terminal():
    out = _Tty()
    with Progress(5, "train", enabled=False, every=0.0, stream=out) as p:
        p.update(5)
    assert out.getvalue() == ""


def test_a_terminal_gets_a_bar_not_lines():
    out = _Tty()
    with Progress(5, "train", unit="step", every=0.0, stream=out) as p:
        p.set_postfix(loss="0.1234")
        p.update(5)
    text = out.getvalue()
    assert "\r" in text and "[train]" not in text  # tqdm redraws in place; no plain lines


def test_postfix_rides_on_the_line():
    out = io.StringIO()
    with Progress(None, "fit", unit="step", every=0.0, stream=out) as p:
        p.set_postfix(loss="0.5000")
        p.update(3)
    line = out.getvalue().splitlines()[0]
    assert line.startswith("[fit] 3 steps, ") and line.endswith(" (loss 0.5000)") and "left" not in line  # no total, no estimate


def test_seconds_read_as_a_person_writes_them():
    assert format_seconds(4.24) == "4.2 s"
    assert format_seconds(42.4) == "42 s"
    assert format_seconds(185) == "3 min 05 s"

"""What a newcomer reads from the CLI (issue 25's polish): the confusion matrix and the plot's path in
``eval``'s text, a resumed run compared with the adapter it resumed from, a mistyped name said
before torch is imported, and progress lines when output is not a terminal."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from mnist_peft.errors import InvalidArgumentError, MnistPeftError

REFERENCE = REPO / "adapters"  # the reference registry: base@1 and digit-0..9@1, read here, never written


def _matrix(text: str) -> list[list[int]]:
    """The confusion matrix out of ``eval``'s text: the ten rows after the header line."""
    lines = text.splitlines()
    at = lines.index("confusion (rows: true digit, columns: predicted):")
    assert lines[at + 1].split() == [str(d) for d in range(10)]
    rows = lines[at + 2 : at + 12]
    assert [r.split(":")[0].strip() for r in rows] == [str(d) for d in range(10)]
    assert len({len(r) for r in rows} | {len(lines[at + 1])}) == 1  # aligned: every line as wide as the header
    return [[int(v) for v in r.split(":")[1].split()] for r in rows]


def test_eval_text_shows_the_confusion_matrix_and_where_the_plot_went(tmp_path: Path, data_root: Path) -> None:
    plot = tmp_path / "errors.png"
    text = run_cli("eval", "--base", "base", "--adapter", "digit-9", "--plot", str(plot))
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[-1] == f"plot: {plot}" and plot.read_bytes()[:4] == b"\x89PNG"
    as_json = run_cli("eval", "--base", "base", "--adapter", "digit-9", "--plot", str(tmp_path / "again.png"), "--json")
    payload = json.loads(as_json.stdout)
    assert payload["plot"] == str(tmp_path / "again.png")
    matrix = _matrix(text.stdout)
    assert matrix == payload["confusion"]  # rows are the true digit: row d sums to the test images of d
    assert [sum(row) - row[d] for d, row in enumerate(matrix)] == payload["wrong_per_digit"]


@pytest.mark.slow  # trains through the CLI (2-3 runs, ~10 s each on a busy machine): CI runs it, the developer loop skips it
def test_a_resumed_run_is_compared_with_the_adapter_it_resumed_from(tmp_path: Path, data_root: Path) -> None:
    root = tmp_path / "adapters"
    shutil.copytree(REFERENCE, root)
    recorded = json.loads(run_cli("registry", "show", "digit-9@1", "--root", str(root)).stdout)["metrics"]
    proc = run_cli("train-adapter", "--base", "base", "--digit", "9", "--resume", "digit-9", "--steps", "2", "--root", str(root), "--quiet")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1] == "compared with the adapter it resumed from, digit-9@1:"
    before = [int(v) for v in lines[3].removeprefix("wrong per digit before: ").split()]
    assert before == recorded["wrong_per_digit"]  # the resumed adapter's errors, not the base's
    assert before != recorded["wrong_per_digit_before"]
    assert lines[2].startswith(f"digit 9 wrong: {before[9]} -> ") and f"accuracy {recorded['accuracy']:.4f} -> " in lines[2]
    assert lines[5].startswith(f"against the base: digit 9 wrong {recorded['wrong_per_digit_before'][9]} -> ")
    assert lines[-1].startswith("saved to digit-9@2 ")
    out = tmp_path / "out"
    proc = run_cli(
        "train-adapter", "--base", "base", "--digit", "9", "--resume", "digit-9@1", "--steps", "2", "--root", str(root), "--out", str(out), "--json"
    )  # fmt: skip
    payload = json.loads(proc.stdout)
    assert payload["resumed_from"]["ref"] == "digit-9@1" and payload["resumed_from"]["wrong_per_digit"] == recorded["wrong_per_digit"]
    assert payload["before"]["wrong_per_digit"] == recorded["wrong_per_digit_before"]  # "before" stays the base, as before


# Every command that takes --base/--adapter/--resume, each with a name the registry does not hold (or
# holds as the other kind, or a version it lacks, or a version that is no version).
_BAD = [
    ("base", "bse", ["eval", "--base", "bse"]),
    ("base", "digit-9", ["eval", "--base", "digit-9"]),
    ("adapter", "digit-99", ["eval", "--base", "base", "--adapter", "digit-99"]),
    ("adapter", "digit-9@7", ["eval", "--base", "base", "--adapter", "digit-9@7"]),
    ("adapter", "digit-9@x", ["eval", "--base", "base", "--adapter", "digit-9@x"]),
    ("adapter", "base", ["headroom", "--base", "base", "--adapter", "base"]),
    ("adapter", "digit-3@2", ["merge", "--base", "base", "--adapter", "digit-9", "--adapter", "digit-3@2", "--out", "OUT"]),
    ("adapter", "nine", ["combine", "--adapter", "nine", "--out", "OUT"]),
    ("adapter", "digit-9@4", ["train-adapter", "--base", "base", "--digit", "9", "--resume", "digit-9@4", "--out", "OUT"]),
    ("base", "bse", ["train-adapter", "--base", "bse", "--digit", "9", "--out", "OUT"]),
    ("base", "bse", ["train-adapters", "--base", "bse", "--register", "d"]),
    ("base", "bse", ["svd", "--base", "bse"]),
    ("adapter", "digit9", ["merge-study", "--adapter", "digit9", "--out", "OUT"]),
    ("base", "bse", ["bench", "--base", "bse"]),
    ("base", "bse", ["compare", "--base", "bse"]),
    ("base", "bse", ["ui", "--base", "bse"]),
]
_PRECHECK = """
import io, json, sys, time
from contextlib import redirect_stderr
from mnist_peft.cli.main import build_parser, main
root, out, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
answers = []
for argv in cases:
    err = io.StringIO()
    start = time.perf_counter()
    with redirect_stderr(err):
        rc = main([out if a == "OUT" else a for a in argv] + ["--root", root])
    answers.append([rc, err.getvalue(), time.perf_counter() - start])
print(json.dumps({"answers": answers, "torch": "torch" in sys.modules}), flush=True)
from mnist_peft.cli.common import check_refs
check_refs(build_parser().parse_args(["eval", "--base", "base", "--adapter", "digit-9", "--root", root]))  # good names pass
print(json.dumps({"torch": "torch" in sys.modules}))
"""


def test_a_bad_name_is_said_before_torch_is_imported_in_the_words_of_the_resolver(tmp_path: Path) -> None:
    from mnist_peft.registry.adapter_registry import AdapterRegistry
    from mnist_peft.registry.refs import resolve_adapter, resolve_base

    cases = [argv for _, _, argv in _BAD]
    proc = subprocess.run(
        [sys.executable, "-c", _PRECHECK, str(REFERENCE), str(tmp_path / "out"), json.dumps(cases)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # no folder of these names here: each is a registry question
        timeout=120,
    )
    result, *good = [json.loads(line) for line in proc.stdout.splitlines()]
    assert result["torch"] is False  # nothing before the error imported torch (seconds on a busy machine)
    assert proc.returncode == 0 and good == [{"torch": False}], proc.stderr  # and good names pass the check torch-free
    registry = AdapterRegistry(REFERENCE)
    for (kind, ref, argv), (rc, err, seconds) in zip(_BAD, result["answers"], strict=True):
        resolve = resolve_base if kind == "base" else resolve_adapter
        with pytest.raises(MnistPeftError) as later:  # what the resolution after torch's import says
            resolve(ref, registry)
        assert (rc, err) == (1, f"error: {later.value}\n"), argv
        assert seconds < 2.0, argv  # generous for a busy 2-core machine: torch's import alone takes 2-15 s here
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # trains through the CLI (2-3 runs, ~10 s each on a busy machine): CI runs it, the developer loop skips it
def test_training_piped_prints_progress_lines_with_an_estimate(tmp_path: Path, data_root: Path) -> None:
    env = {"MNIST_PEFT_PROGRESS_EVERY": "0"}  # a line at every step: a tiny run still shows them
    proc = run_cli("train-base", "--epochs", "0.02", "--out", str(tmp_path / "base"), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[train-base] ")]
    assert re.fullmatch(r"\[train-base\] 1/9 steps, [0-9.]+ s, ~[0-9.]+ s left", lines[0]), lines
    assert re.fullmatch(r"\[train-base\] 9/9 steps, [0-9.]+ s \(loss [0-9.]+\)", lines[-1]), lines
    assert len(lines) == 9
    proc = run_cli("train-adapter", "--base", "base", "--digit", "9", "--steps", "3", "--out", str(tmp_path / "a"), env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[digit-9] ")]
    assert [line.split(",")[0] for line in lines] == ["[digit-9] 1/3 steps", "[digit-9] 2/3 steps", "[digit-9] 3/3 steps"]
    assert lines[0].endswith(" left")
    quiet = run_cli("train-adapter", "--base", "base", "--digit", "9", "--steps", "3", "--out", str(tmp_path / "q"), "--quiet", env=env)
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_the_progress_interval_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from mnist_peft.progress import LINE_EVERY, Progress

    monkeypatch.delenv("MNIST_PEFT_PROGRESS_EVERY", raising=False)
    assert Progress(3, "x", stream=io.StringIO()).every == LINE_EVERY
    monkeypatch.setenv("MNIST_PEFT_PROGRESS_EVERY", "0.25")
    assert Progress(3, "x", stream=io.StringIO()).every == 0.25
    assert Progress(3, "x", every=7.0, stream=io.StringIO()).every == 7.0  # an explicit interval wins
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv("MNIST_PEFT_PROGRESS_EVERY", bad)
        with pytest.raises(InvalidArgumentError, match=r"MNIST_PEFT_PROGRESS_EVERY must be a number of seconds >= 0.*unset it"):
            Progress(3, "x", stream=io.StringIO())

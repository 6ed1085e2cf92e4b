"""The main job on a tiny configuration, end to end in a subprocess."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow


def test_demo_quick_produces_the_report_and_plots_and_skips_finished_stages(tmp_path: Path, data_root) -> None:
    """Also what a person sees with output in a pipe: plain progress lines (no bar) with an estimate
    of the time left, and every stage's time at the end (the line interval set to 0, so that a quick
    run shows lines; the real one is 5 s)."""
    out = tmp_path / "demo"
    proc = run_cli("demo", "--quick", "--out", str(out), env={"MNIST_PEFT_PROGRESS_EVERY": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\[merge\] \d+/\d+ evaluations, [\d.]+ s, ~[\d.]+ s left$", proc.stderr, re.M), proc.stderr
    assert re.search(r"^\[parity\] \d+/\d+ cases", proc.stderr, re.M), proc.stderr
    assert "\r" not in proc.stderr  # no bar drawn into a pipe
    stages = next(line for line in proc.stdout.splitlines() if line.startswith("stages: "))
    for name in ("base", "seed", "replay", "headroom", "combine", "exact", "parity", "svd", "merge", "report"):
        assert re.search(rf"\b{name} [\d.]+ s\b", stages), (name, stages)
    start = time.perf_counter()
    again = run_cli("demo", "--quick", "--out", str(out), "--json")
    assert again.returncode == 0 and time.perf_counter() - start < 30
    summary = json.loads(again.stdout)
    assert summary["stages"]["merge"] is None and summary["stages"]["report"] > 0  # finished stages skipped, and say so
    for name in (
        "error-rates-before.png",
        "error-rates-seed-lora.png",
        "error-rates-replay-lora.png",
        "adapter-digit-heatmap.png",
        "svd-accuracy-vs-rank.png",
        "savings.png",
        "merge-vs-density.png",
    ):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    report = (out / "report.md").read_text()
    for heading in (
        "The seed's experiment",
        "replay adapters",
        "Stacking and combining",
        "Exactness",
        "Native LoRA vs peft",
        "SVD",
        "One adapter for all ten digits",
    ):
        assert heading in report, heading
    assert "| seed notebook, base (printed) | 0.953 | 33 28 42 95 19 10 61 52 19 107 |" in report
    assert report.count("| digit-") >= 20  # the 10-row table and the 10 x 10 table
    assert summary["exact"] == {"adapter_changes_output": True, "lora_off_equals_base": True, "unmerge_100_cycles_bit_exact": True}
    seed = json.loads((out / "stages" / "seed.json").read_text())
    assert seed["lora_off_equals_before"] and seed["lora_parameters"] == 6_794 and seed["total_parameters"] == 2_813_804
    merge = json.loads((out / "stages" / "merge.json").read_text())
    for method, chosen in merge["chosen"].items():  # chosen on validation loss, never on the test set
        rows = [r for r in merge["grid"] if r["method"] == method]
        assert chosen["val_loss"] == min(r["val_loss"] for r in rows)
        edge = f" (grid edge: {', '.join(chosen['on_edge'])})" if chosen["on_edge"] else ""
        assert f"| {method} | density {chosen['density']:g}, scale {chosen['scale']:g}{edge} | {chosen['test']['accuracy']:.4f} |" in report


def test_a_stage_saved_by_an_older_version_is_redone(tmp_path: Path) -> None:
    from mnist_peft.experiments.demo import _Stages

    stages = _Stages(tmp_path, force=False, log=lambda line: None)
    (tmp_path / "stages" / "merge.json").write_text('{"grid": []}')  # no "curve": an older demo's
    calls = []
    result = stages.run("merge", lambda: calls.append(1) or {"grid": [], "curve": [1]}, needs=("curve",))
    assert calls == [1] and result["curve"] == [1]
    again = stages.run("merge", lambda: calls.append(2) or {}, needs=("curve",))
    assert calls == [1] and again["curve"] == [1]  # now it is kept

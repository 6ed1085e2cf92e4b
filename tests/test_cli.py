"""The real CLI in a subprocess: JSON output, errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_cli


def test_info_json_reports_the_seed_parameter_count() -> None:
    proc = run_cli("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["parameters"] == 2_807_010
    assert info["layers"]["linear2"] == [2000, 1000]


def test_version_and_help() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("mnist-peft ")
    for cmd in ("info", "train-base", "eval", "merge", "compare", "bench"):
        proc = run_cli(cmd, "--help")
        assert proc.returncode == 0 and "usage: mnist-peft" in proc.stdout, cmd


def test_eval_json_has_the_design_fields(trained_base_dir: Path, data_root: Path, tmp_path: Path) -> None:
    plot = tmp_path / "err.png"
    proc = run_cli("eval", "--base", str(trained_base_dir), "--json", "--plot", str(plot), "--data-dir", str(data_root))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["n"] == 10_000 and 0.9 < out["accuracy"] <= 1.0
    assert len(out["wrong_per_digit"]) == 10 and all(isinstance(w, int) for w in out["wrong_per_digit"])
    assert len(out["error_rate_per_digit"]) == 10
    assert abs(out["accuracy"] - (1 - sum(out["wrong_per_digit"]) / 10_000)) < 1e-12
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_base_cli_saves_a_loadable_model(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "base"
    proc = run_cli("train-base", "--out", str(out), "--epochs", "0.05", "--json", "--quiet", "--data-dir", str(data_root))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["steps"] == round(0.05 * 469) and (out / "model.safetensors").is_file()
    again = run_cli("eval", "--base", str(out), "--json", "--data-dir", str(data_root))
    assert json.loads(again.stdout)["accuracy"] == result["accuracy"]
    refused = run_cli("train-base", "--out", str(out), "--epochs", "0.05", "--data-dir", str(data_root))
    assert refused.returncode == 2 and "--force" in refused.stderr


def test_bad_base_path_is_one_line_error_with_exit_1(tmp_path: Path) -> None:
    proc = run_cli("eval", "--base", str(tmp_path / "nope"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0]
    assert "Traceback" not in proc.stderr


def test_usage_error_exits_2() -> None:
    proc = run_cli("eval")
    assert proc.returncode == 2 and "--base" in proc.stderr

"""The real CLI in a subprocess: JSON output, errors, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
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
    for cmd in ("info", "train-base", "eval", "merge", "compare", "bench", "headroom"):
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


@pytest.mark.slow  # trains or runs a whole Hub round trip through the CLI: CI runs it, the developer loop skips it
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


@pytest.mark.slow  # five CLI runs over the reference adapters, each evaluating the test set (~14 s): CI runs it
def test_merge_and_combine_cli_on_registry_adapters(tmp_path: Path, data_root: Path) -> None:
    merged = tmp_path / "merged"
    proc = run_cli("merge", "--base", "base", "--adapter", "digit-9", "--out", str(merged), "--json")
    assert proc.returncode == 0, proc.stderr
    plain = json.loads(run_cli("eval", "--base", str(merged), "--json").stdout)
    stacked = json.loads(run_cli("eval", "--base", "base", "--adapter", "digit-9", "--json").stdout)
    assert plain["wrong_per_digit"] == stacked["wrong_per_digit"]
    combined = tmp_path / "c39"
    proc = run_cli("combine", "--adapter", "digit-3", "--adapter", "digit-9", "--method", "cat", "--out", str(combined), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["r"] == 8
    proc = run_cli("combine", "--adapter", str(combined), "--method", "svd", "--r", "2", "--out", str(tmp_path / "small"), "--json")
    assert proc.returncode == 0, proc.stderr
    errors = json.loads(proc.stdout)["relative_error"]
    assert set(errors) == {"linear1", "linear2", "linear3"} and all(0 < e < 1 for e in errors.values())
    evaluated = run_cli("eval", "--base", "base", "--adapter", str(tmp_path / "small"), "--json")
    assert evaluated.returncode == 0 and json.loads(evaluated.stdout)["n"] == 10_000


@pytest.mark.slow  # trains or runs a whole Hub round trip through the CLI: CI runs it, the developer loop skips it
def test_svd_and_compare_cli(tmp_path: Path, data_root: Path) -> None:
    plot = tmp_path / "svd.png"
    proc = run_cli("svd", "--base", "base", "--digit", "9", "--ranks", "1", "2", "--steps", "5", "--plot", str(plot), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [r["r"] for r in out["rows"]] == [1, 2] and out["full"]["parameters"] == 784 * 1000 + 1000 * 2000 + 2000 * 10
    assert plot.read_bytes()[:4] == b"\x89PNG"
    proc = run_cli("compare", "--r", "4", "--steps", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and len(report["cases"]) == 12 and all(c["forward_max_diff"] == 0.0 for c in report["cases"])


def test_commands_that_compute_nothing_start_without_torch(tmp_path: Path) -> None:
    """The README's claim: registry, push, pull and the top-level --help never import torch (they stay cheap)."""
    import subprocess
    import sys

    from conftest import REPO

    code = (
        "import sys\nfrom mnist_peft.cli.main import main\n"
        "for argv in (['registry', 'list', '--root', sys.argv[1]], ['push', '--repo-id', 'a/b', '--root', sys.argv[1]],"
        " ['pull', '--repo-id', 'a/b', '--root', sys.argv[1]], ['--help'], ['--version']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)\n"
    )
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert proc.stdout.strip().splitlines()[-1] == "False", proc.stdout + proc.stderr

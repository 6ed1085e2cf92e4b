"""``mnist-peft bench --json``: every figure present, each a real measurement."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

FIGURES = {
    "forward_unmerged",
    "merge_unmerge",
    "mixed_batch",
    "hot_swap",
    "adapter_load",
    "train_epoch",
    "adapter_file_size",
    "registry_add",
    "registry_get",
    "combine_ten",
    "train_ten_adapters",
    "ui_throughput",
}


@pytest.mark.slow
def test_bench_json_schema_and_ratios_are_computed_from_the_measurements(data_root) -> None:
    proc = run_cli(
        "bench", "--json", "--reps", "2", "--images", "1000", "--train-fraction", "0.02", "--registry-entries", "300", timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    figures = {f["name"]: f for f in out["figures"]}
    assert set(figures) == FIGURES
    for f in figures.values():
        assert set(f) >= {"name", "ours", "peft", "base", "ratio", "target", "unit", "pass"}
        assert f["ours"] > 0 and f["target"] > 0 and isinstance(f["pass"], bool)
        denominator = f["base"] if f["base"] is not None else f["peft"]
        assert abs(f["ratio"] - f["ours"] / denominator) < 1e-9, f["name"]
    for name in ("forward_unmerged", "mixed_batch"):
        assert figures[name]["unit"] == "s" and figures[name]["peft"] > 0 and figures[name]["base"] > 0
    assert "batch 1000," in figures["forward_unmerged"]["note"] and "1000 images" in figures["mixed_batch"]["note"]  # --images
    for name in ("merge_unmerge", "hot_swap", "adapter_load"):
        assert figures[name]["unit"] == "ms" and figures[name]["peft"] > 0
    for name in ("registry_add", "registry_get"):
        assert figures[name]["unit"] == "s" and figures[name]["base"] > 0 and "at 300 entries / at 10 entries" in figures[name]["note"]
    size = figures["adapter_file_size"]
    assert size["base"] == 6_794 * 4 and size["ours"] > size["base"]  # raw tensor bytes of an r=1 adapter
    assert out["machine"]["cpu_count"] >= 1


def test_bench_strict_exit_code_follows_the_targets(data_root) -> None:
    proc = run_cli("bench", "--json", "--only", "adapter_file_size", "--strict")
    figure = json.loads(proc.stdout)["figures"][0]
    assert proc.returncode == (0 if figure["pass"] else 1)
    unknown = run_cli("bench", "--only", "nope")
    assert unknown.returncode == 1 and "unknown figure" in unknown.stderr

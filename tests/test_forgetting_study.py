"""The forgetting study's rules: both targets, the sign test, and the real ``mnist-peft
forgetting-study --quick`` end to end (chosen on the held-out split, reported on test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

from mnist_peft.experiments.forgetting import meets_both
from mnist_peft.experiments.merge_study import sign_test


def test_both_targets_need_the_cut_and_the_accuracy() -> None:
    assert meets_both(10, 0.9868, 6, 0.9868)  # 40% cut, accuracy kept
    assert not meets_both(10, 0.9868, 6.1, 0.9870)  # cut short of 40%
    assert not meets_both(10, 0.9868, 2, 0.9867)  # accuracy below the base's
    assert meets_both(17, 0.9868, 10.2, 0.9868) and not meets_both(17, 0.9868, 10.3, 0.9868)


def test_the_sign_test_is_the_two_sided_binomial_tail() -> None:
    assert sign_test(0, 0) == 1.0
    assert sign_test(5, 5) == 1.0
    assert sign_test(10, 0) == pytest.approx(2 / 1024)
    assert sign_test(9, 1) == pytest.approx(2 * 11 / 1024)  # 0.021
    assert sign_test(8, 2) == pytest.approx(2 * 56 / 1024)  # 0.109
    assert sign_test(2, 8) == sign_test(8, 2)


@pytest.mark.slow
def test_the_forgetting_study_command_chooses_on_validation_and_reports_each_recipe_on_test(tmp_path: Path, data_root: Path) -> None:
    out = tmp_path / "study"
    result = run_cli("forgetting-study", "--out", str(out), "--quick", "--json", "--data-dir", str(data_root), timeout=900)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found == json.loads((out / "forgetting.json").read_text())
    chosen = found["chosen"]
    assert chosen["alpha"] == 34.0 and chosen["energy"] == 0.99  # the quick run's only candidates
    assert set(chosen["tried"]) == {"elastic alpha=34", "null-space energy=0.99", "elastic-null-space", "replay", "replay-affine"}
    base = found["base_test"]
    assert set(found["recipes"]) == {"replay", "replay-affine", "elastic", "null-space", "elastic-null-space"}
    for name, recipe in found["recipes"].items():
        assert [(r["digit"], r["seed"]) for r in recipe["rows"]] == [(8, 0), (9, 0)]
        for d in recipe["digits"]:
            row = next(r for r in recipe["rows"] if r["digit"] == d["digit"])
            assert d["met"] == meets_both(base["wrong_per_digit"][d["digit"]], base["accuracy"], row["wrong"], row["accuracy"])
        assert recipe["met"] == sum(d["met"] for d in recipe["digits"])
        assert all(("null_space" in r) == ("null-space" in name) for r in recipe["rows"])
        assert sorted(p.name for p in (out / "adapters" / name).iterdir()) == ["digit-8", "digit-9"]  # seed 0's, saved
    assert (out / "study-base" / "model.safetensors").is_file()

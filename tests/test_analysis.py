"""The exact logit-offset trade-off (``mnist-peft headroom``), checked against brute force."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from mnist_peft.experiments.headroom import logit_offset_tradeoff
from mnist_peft.model.data import MnistSplit
from mnist_peft.model.mlp import load_base


def _errors_with_offset(logits: torch.Tensor, y: torch.Tensor, digit: int, offset: float) -> tuple[int, int]:
    shifted = logits.clone()
    shifted[:, digit] += offset
    wrong = shifted.argmax(1) != y
    return int((wrong & (y == digit)).sum()), int(wrong.sum())


def test_the_reported_offset_does_what_it_says_and_none_does_better(trained_base_dir: Path, mnist_test) -> None:
    model = load_base(trained_base_dir)
    split = MnistSplit(mnist_test.x[:2000], mnist_test.y[:2000])
    rows = logit_offset_tradeoff(model, split)
    with torch.no_grad():
        logits = model(split.x).double()
    for row in rows:
        d = row.digit
        assert (row.wrong_before, row.total_wrong_before) == _errors_with_offset(logits, split.y, d, 0.0)
        assert row.allowed == int(0.6 * row.wrong_before + 1e-9)
        assert row.offset is not None  # a large enough offset always fixes every digit-d image
        assert (row.wrong_after, row.total_wrong_after) == _errors_with_offset(logits, split.y, d, row.offset)
        assert row.wrong_after <= row.allowed
        assert row.both_met == (row.total_wrong_after <= row.total_wrong_before)
        # Brute force: every offset between two consecutive thresholds, and beyond both ends.
        others = logits.clone()
        others[:, d] = -torch.inf
        t = torch.unique(others.max(1).values - logits[:, d])
        candidates = torch.cat([t[:1] - 1, (t[1:] + t[:-1]) / 2, t[-1:] + 1])
        best = min(
            total for wrong, total in (_errors_with_offset(logits, split.y, d, float(b)) for b in candidates) if wrong <= row.allowed
        )
        assert row.total_wrong_after == best


def test_a_weaker_cut_never_costs_more(trained_base_dir: Path, mnist_test) -> None:
    model = load_base(trained_base_dir)
    split = MnistSplit(mnist_test.x[:2000], mnist_test.y[:2000])
    strict = logit_offset_tradeoff(model, split, cut=0.8)
    loose = logit_offset_tradeoff(model, split, cut=0.2)
    assert all(lo.total_wrong_after <= st.total_wrong_after for lo, st in zip(loose, strict, strict=True))
    with pytest.raises(ValueError, match="cut must be in"):
        logit_offset_tradeoff(model, split, cut=0)


@pytest.mark.slow  # the headroom sweep over the whole test set through the CLI (~8 s): CI runs it
def test_headroom_cli(trained_base_dir: Path, data_root: Path) -> None:
    proc = run_cli("headroom", "--base", str(trained_base_dir), "--json", "--data-dir", str(data_root))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["cut"] == 0.4 and [r["digit"] for r in out["rows"]] == list(range(10))
    assert out["both_met"] == sum(r["both_met"] for r in out["rows"])
    text = run_cli("headroom", "--base", str(trained_base_dir), "--data-dir", str(data_root))
    assert text.returncode == 0 and "digits can meet both targets" in text.stdout
    bad = run_cli("headroom", "--base", str(trained_base_dir), "--cut", "1.5", "--data-dir", str(data_root))
    assert bad.returncode == 2 and "--cut: 1.5 is outside (0, 1]" in bad.stderr

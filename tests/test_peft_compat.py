"""Ours vs theirs: every parity case of the grid, with non-trivial adapters."""

from __future__ import annotations

import pytest
import torch

from mnist_peft.model import MnistMLP
from mnist_peft.peft_compat import (
    FORWARD_TOLERANCE,
    FUSED_TOLERANCE,
    GRAD_TOLERANCE,
    MERGE_TOLERANCE_ULPS,
    TRAIN_TOLERANCE,
    default_cases,
    native_to_peft_state_dict,
    peft_to_native_state_dict,
    run_case,
)

CASES = default_cases()


def test_grid_covers_the_issue_cases() -> None:
    assert {c.r for c in CASES} == {1, 4, 16}
    assert {(c.r, c.lora_alpha) for c in CASES if c.r == 4} == {(4, 1), (4, 4), (4, 8)}
    assert {c.use_rslora for c in CASES} == {False, True}
    assert len({c.target_modules for c in CASES}) == 2


@pytest.fixture(scope="module")
def parity_data(mnist_train):
    torch.manual_seed(0)
    base = MnistMLP().eval()
    batches = [(mnist_train.x[i * 32 : (i + 1) * 32], mnist_train.y[i * 32 : (i + 1) * 32]) for i in range(100)]
    return base, mnist_train.x[:32], mnist_train.y[:32], batches


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_native_matches_peft(case, parity_data) -> None:
    base, x, y, batches = parity_data
    result = run_case(case, base, x, y, train_batches=batches)
    assert result.adapter_effect > 1e-3, "the adapter must change the output, or equality is trivial"
    assert result.init_equal, "seeded init must give peft's bits"
    assert result.forward_max_diff <= FORWARD_TOLERANCE
    assert result.grad_max_diff <= GRAD_TOLERANCE
    assert result.train_max_diff <= TRAIN_TOLERANCE
    assert result.merged_max_ulps <= MERGE_TOLERANCE_ULPS
    assert result.fused_max_diff <= FUSED_TOLERANCE
    assert result.unmerge_exact
    assert result.passed


def test_state_dict_key_mapping_round_trips() -> None:
    native = {"linear1.lora_A.weight": torch.zeros(2, 3), "linear1.lora_B.weight": torch.ones(4, 2)}
    theirs = native_to_peft_state_dict(native, "default")
    assert set(theirs) == {"base_model.model.linear1.lora_A.default.weight", "base_model.model.linear1.lora_B.default.weight"}
    assert peft_to_native_state_dict(theirs).keys() == native.keys()

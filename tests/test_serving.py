"""Mixed-adapter batches and hot swap."""

from __future__ import annotations

import copy

import pytest
import torch

from mnist_peft.errors import AdapterStateError
from mnist_peft.serving.forward import hot_swap, mixed_forward
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel, set_forward_mode
from mnist_peft.tuners.lora.targets import lora_layers

# The mixed path runs the base GEMM over the whole (reordered) batch and adds each adapter's update
# to its rows with an in-place rank-r addmm_; against one sample alone (the exact path: peft's op
# order, batch of one) the float32 sums are grouped differently and differ by a few ulps of the
# largest logit: 1e-6 relative (measured 7.2e-7 on 200 images, no more than the bare base's own
# batch-of-N vs batch-of-1 difference; `mnist-peft bench --only mixed_batch` prints both).
MIXED_RELATIVE_TOLERANCE = 1e-6


@pytest.fixture()
def multi(random_base) -> LoraModel:
    model = LoraModel(copy.deepcopy(random_base))
    for i in range(4):
        torch.manual_seed(i)
        model.add_adapter(f"a{i}", LoraConfig(r=2 + i, lora_alpha=4, init_lora_weights=False))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def test_mixed_batch_equals_each_sample_alone(multi, random_base) -> None:
    torch.manual_seed(9)
    x = torch.randn(12, 784)
    names = ["a0", None, "a3", "a1", "a2", None, "a0", "a3", "a1", "a1", "a2", "a0"]
    y = mixed_forward(multi, x, names)
    tolerance = MIXED_RELATIVE_TOLERANCE * max(1.0, float(y.abs().max()))
    set_forward_mode(multi, "exact")
    for i, name in enumerate(names):
        if name is None:
            alone = random_base(x[i : i + 1])
            assert (y[i] - alone[0]).abs().max() <= tolerance
        else:
            multi.set_adapter(name)
            alone = multi(x[i : i + 1])
            assert (alone - random_base(x[i : i + 1])).abs().max() > 1e-3  # the adapter matters
            assert (y[i] - alone[0]).abs().max() <= tolerance, (i, name)


def test_mixed_batch_answers_in_the_callers_order_whatever_the_order_of_names(multi) -> None:
    """The batch is grouped by adapter inside; the answer's rows come back in the order asked."""
    torch.manual_seed(3)
    x = torch.randn(9, 784)
    names = ["a2", "a0", None, "a2", "a1", None, "a0", "a3", "a1"]
    y = mixed_forward(multi, x, names)
    order = sorted(range(9), key=lambda i: (names[i] is not None, names[i] or ""))  # already grouped
    y_grouped = mixed_forward(multi, x[order], [names[i] for i in order])
    assert (y[order] - y_grouped).abs().max() <= MIXED_RELATIVE_TOLERANCE * max(1.0, float(y.abs().max()))
    assert (y[0] - y[1]).abs().max() > 1e-3  # rows really differ, so a mix-up would show


def test_mixed_batch_refuses_bad_input(multi) -> None:
    x = torch.randn(2, 784)
    with pytest.raises(AdapterStateError, match="one per sample"):
        mixed_forward(multi, x, ["a0"])
    with pytest.raises(AdapterStateError, match="no adapter named 'zz'"):
        mixed_forward(multi, x, ["a0", "zz"])
    multi.merge()
    with pytest.raises(AdapterStateError, match="unmerge"):
        mixed_forward(multi, x, ["a0", "a1"])
    assert multi.state.mixed is None


def test_hot_swap_restores_base_bytes_and_merges_the_new_adapter(multi, random_base) -> None:
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(multi.model)}
    x = torch.randn(4, 784)
    multi.set_adapter("a1")
    expected_a1 = multi(x)
    multi.set_adapter("a2")
    expected_a2 = multi(x)
    for _ in range(50):
        hot_swap(multi, "a1")
        hot_swap(multi, "a2")
    assert multi.merged_adapters == ["a2"]
    torch.testing.assert_close(multi(x), expected_a2, rtol=0, atol=1e-4)
    hot_swap(multi, "a1")
    torch.testing.assert_close(multi(x), expected_a1, rtol=0, atol=1e-4)
    multi.unmerge()
    assert all(torch.equal(originals[n], layer.base_layer.weight) for n, layer in lora_layers(multi.model))


def test_mixed_batch_refuses_a_model_whose_layers_do_not_see_one_row_per_sample() -> None:
    """A model folding tokens into the batch dimension would mix samples' adapters: refused, not wrong."""
    from torch import nn

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, t, f = x.shape
            return self.fc(x.reshape(n * t, f)).reshape(n, t, -1)

    model = LoraModel(Tokens())
    for name in ("a", "b"):
        model.add_adapter(name, LoraConfig(r=2, init_lora_weights=False, target_modules=["fc"]))
    with pytest.raises(AdapterStateError, match="one row per sample"):
        mixed_forward(model.eval(), torch.randn(4, 3, 6), ["b", None, "a", "a"])
    assert model.state.mixed is None


def test_an_empty_mixed_batch_gives_an_empty_answer(multi) -> None:
    assert mixed_forward(multi, torch.randn(0, 784), []).shape == (0, 10)


def test_grouped_lora_blocks_keep_each_row_to_its_own_adapter_whatever_the_others_hold(multi) -> None:
    """Plain-LoRA blocks of a mixed batch share two GEMMs (``_mixed_group_``). A row that overflows, an
    adapter whose A is NaN, or one whose B is NaN (edited in place, past the load gate) reaches no
    other row: those rows answer as when the bad adapter and row are not in the batch at all."""
    torch.manual_seed(4)
    x = torch.randn(8, 784)
    names = ["a0", "a1", "a2", "a3", "a0", "a1", None, "a2"]
    clean = mixed_forward(multi, x, names)
    good = [i for i, n in enumerate(names) if n != "a2"]
    x_bad = x.clone()
    x_bad[2] = 1e38  # an a2 row whose values overflow to inf
    layers = [layer for _, layer in lora_layers(multi)]
    layers[0].lora_A["a2"].data[0, 0] = float("nan")
    y = mixed_forward(multi, x_bad, names)
    assert torch.equal(y[good], clean[good])
    layers[1].lora_B["a2"].data[0, 0] = float("nan")  # 0 x NaN is NaN: this batch takes the per-block path
    y = mixed_forward(multi, x_bad, names)
    assert torch.isfinite(y[good]).all()
    torch.testing.assert_close(
        y[good], clean[good], rtol=MIXED_RELATIVE_TOLERANCE, atol=MIXED_RELATIVE_TOLERANCE * float(clean.abs().max())
    )
    assert not torch.isfinite(y[[2, 7]]).all()

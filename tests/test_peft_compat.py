"""Ours vs theirs: every parity case of the grid, with non-trivial adapters."""

from __future__ import annotations

import pytest
import torch

from mnist_peft.io.peft_compat import (
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
from mnist_peft.model.mlp import MnistMLP

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


def _merged_pair(r: int, alpha: float, seed: int = 1, dtype: torch.dtype = torch.float32):
    import copy

    import peft

    from mnist_peft.io.peft_compat import to_peft_config
    from mnist_peft.tuners.lora.config import LoraConfig
    from mnist_peft.tuners.lora.model import LoraModel
    from mnist_peft.tuners.lora.targets import lora_layers

    torch.manual_seed(0)
    base = MnistMLP().eval()
    cfg = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False)
    torch.manual_seed(seed)
    ours = LoraModel(copy.deepcopy(base), cfg).to(dtype)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), to_peft_config(cfg)).to(dtype)
    with torch.no_grad():
        ours.merge()
        theirs.merge_adapter()
    pairs = [(layer.base_layer.weight, getattr(theirs.base_model.model, name).base_layer.weight) for name, layer in lora_layers(ours.model)]
    return ours, pairs


@pytest.mark.parametrize(("r", "alpha"), [(1, 2), (4, 8), (4, 12), (16, 16), (16, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_merged_weights_are_peft_merged_weights_bit_for_bit(r: int, alpha: float, dtype: torch.dtype) -> None:
    # the README's claim: our merge rounds as peft's (one addmm pass where this BLAS rounds so, else
    # two; half precision on CPU through a float32 delta, as peft computes it). Both models are cast
    # whole, so peft's adapters are in the model's dtype too (on a half base peft would keep them in
    # float32 by default, autocast_adapter_dtype=True, and merge other bits).
    _, pairs = _merged_pair(r, alpha, dtype=dtype)
    assert len(pairs) == 3
    for ours, theirs in pairs:
        assert ours.dtype == dtype and torch.equal(ours, theirs)


def test_a_blas_whose_addmm_rounds_otherwise_is_caught_by_the_probe(monkeypatch) -> None:
    """An addmm that rounds once (as a fused kernel would) must never reach a merged weight: the
    probe sees it differ from the two-step and the merge keeps the two-step, peft's bits."""
    from mnist_peft.tuners.lora import ledger

    calls = {"n": 0}

    def rounds_once(w, b, a, *, out):
        calls["n"] += 1
        return out.copy_((w.double() + b.double() @ a.double()).to(out.dtype))

    monkeypatch.setattr(ledger, "_ADDMM_TWO_STEP", {})
    monkeypatch.setattr(torch, "addmm", rounds_once)
    _, pairs = _merged_pair(4, 8)
    assert calls["n"] == 3 and all(v is False for v in ledger._ADDMM_TWO_STEP.values())  # each layer probed, none used
    for o, t in pairs:
        assert torch.equal(o, t)


def test_merges_take_addmm_only_where_probed_and_a_touched_unmerge_stays_bit_exact(monkeypatch) -> None:
    """Where the probe says yes the merge is one addmm; either way, after a ``.data`` touch (which
    makes unmerge recompute the merged weight and compare), unmerge gives the original tensor back."""
    from mnist_peft.tuners.lora import ledger
    from mnist_peft.tuners.lora.targets import lora_layers

    monkeypatch.setattr(ledger, "_ADDMM_TWO_STEP", {})
    used: list[tuple[int, ...]] = []
    real = torch.addmm

    def spy(w, b, a, *, out):
        used.append(tuple(out.shape))
        return real(w, b, a, out=out)

    monkeypatch.setattr(torch, "addmm", spy)
    ours, pairs = _merged_pair(4, 8)  # probes each layer (the probe calls addmm too)
    probed = {key[0]: ok for key, ok in ledger._ADDMM_TWO_STEP.items()}
    assert set(probed) == {(1000, 784), (2000, 1000), (10, 2000)}
    ours.unmerge()
    used.clear()
    with torch.no_grad():
        ours.merge()  # probed already: only the merges' own calls now
    assert sorted(used) == sorted(shape for shape, ok in probed.items() if ok)
    for layer_weight, theirs in pairs:
        assert torch.equal(layer_weight, theirs)
    originals = {name: layer._merge.original.clone() for name, layer in lora_layers(ours.model)}
    for _, layer in lora_layers(ours.model):
        layer.base_layer.weight.data.sum()  # a touch that edits nothing
    ours.unmerge()
    for name, layer in lora_layers(ours.model):
        assert torch.equal(layer.base_layer.weight, originals[name]), name


@pytest.mark.parametrize("alpha", [8, 12])  # s = 2 (may take addmm) and s = 3 (two steps)
@pytest.mark.parametrize(("at_merge", "at_unmerge"), [(1, 2), (2, 1)])
def test_unmerge_after_a_touch_is_bit_exact_when_the_thread_count_changed(at_merge: int, at_unmerge: int, alpha: int) -> None:
    """A GEMM's rounding can depend on how many threads split it; unmerge's recomputation runs on
    as many threads as the merge did."""
    from mnist_peft.tuners.lora.targets import lora_layers

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(at_merge)
        ours, _ = _merged_pair(4, alpha)
        originals = {name: layer._merge.original.clone() for name, layer in lora_layers(ours.model)}
        for _, layer in lora_layers(ours.model):
            layer.base_layer.weight.data.sum()
        torch.set_num_threads(at_unmerge)
        ours.unmerge()
        assert torch.get_num_threads() == at_unmerge  # restored after the recomputation
    finally:
        torch.set_num_threads(threads)
    for name, layer in lora_layers(ours.model):
        assert torch.equal(layer.base_layer.weight, originals[name]), name


def _rounds_once(w, b, a, *, out):
    """An addmm whose kernel rounds once (``W + B A`` summed exactly, then rounded), as a fused one would."""
    return out.copy_((w.double() + b.double() @ a.double()).to(out.dtype))


def test_unmerge_replays_each_merge_call_the_way_it_ran(monkeypatch) -> None:
    """Two merge() calls, each starting with ``W + delta`` in one pass; with a one-pass kernel that
    rounds otherwise than the two-step (forced in here), a replay that took the two-step for the
    second call's delta would not give the merged weight back, and a touched unmerge would drift."""
    from mnist_peft.tuners.lora import ledger
    from mnist_peft.tuners.lora.config import LoraConfig
    from mnist_peft.tuners.lora.model import LoraModel
    from mnist_peft.tuners.lora.targets import lora_layers

    monkeypatch.setattr(torch, "addmm", _rounds_once)
    monkeypatch.setattr(ledger, "_addmm_is_two_step", lambda *args: True)
    torch.manual_seed(0)
    model = LoraModel(MnistMLP().eval(), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    torch.manual_seed(1)
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model.model)}
    with torch.no_grad():
        model.merge(["default"])
        model.merge(["second"])
    for _, layer in lora_layers(model.model):
        assert len(layer._merge.log) == 2 and all(m.first for m in layer._merge.log)  # each call began with W + delta
        layer.base_layer.weight.data.sum()  # a touch: unmerge now recomputes the merged weight and compares
    model.unmerge()
    for name, layer in lora_layers(model.model):
        assert torch.equal(layer.base_layer.weight, originals[name]), name


def test_the_probe_is_not_fooled_by_float64_products_that_happen_to_be_exact(monkeypatch) -> None:
    """A one-pass kernel that rounds otherwise only where products are not exact in float64: probe
    operands with float32 values would all be exact and hide it; the probe draws float64 values."""
    from mnist_peft.tuners.lora import ledger

    def exact_only_on_float32_values(w, b, a, *, out):
        if all(torch.equal(t, t.float().double()) for t in (w, b, a)):  # every product exact: no rounding to tell
            return out.copy_(torch.matmul(b, a).add_(w))
        # else the sum kept in extended precision and rounded once (x86's 80-bit long double)
        import numpy as np

        ext = w.numpy().astype(np.longdouble) + b.numpy().astype(np.longdouble) @ a.numpy().astype(np.longdouble)
        return out.copy_(torch.from_numpy(ext.astype(np.float64)))

    monkeypatch.setattr(ledger, "_ADDMM_TWO_STEP", {})
    monkeypatch.setattr(torch, "addmm", exact_only_on_float32_values)
    w, b, a = torch.zeros(100, 64, dtype=torch.float64), torch.zeros(100, 1, dtype=torch.float64), torch.zeros(1, 64, dtype=torch.float64)
    assert ledger._addmm_is_two_step(torch.empty_like(w), w, b, a) is False


def test_unmerge_after_a_cast_while_merged_keeps_negative_zeros() -> None:
    from mnist_peft.tuners.lora.config import LoraConfig
    from mnist_peft.tuners.lora.model import LoraModel

    torch.manual_seed(0)
    base = MnistMLP().eval()
    with torch.no_grad():
        base.linear2.weight[:5, 0] = -0.0  # pruned weights hold -0.0
    model = LoraModel(base, LoraConfig(r=4, lora_alpha=8))  # B = 0: the merge changes nothing
    original = model.model.linear2.base_layer.weight.detach().to(torch.float64)
    with torch.no_grad():
        model.merge()
    model.to(torch.float64)  # a cast while merged: unmerge must tell an edit from the cast
    model.unmerge()
    restored = model.model.linear2.base_layer.weight.detach()
    assert torch.equal(restored, original)
    assert bool(torch.signbit(restored[:5, 0]).all())  # still -0.0 (torch.equal does not tell)

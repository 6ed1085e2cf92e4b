"""The call sequences that once gave silently wrong outputs, each as a plain regression test."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import exact_forward, run_cli

from mnist_peft.errors import AdapterStateError, FingerprintMismatchError
from mnist_peft.io.adapters import load_stack, read_adapter, save_adapter
from mnist_peft.io.peft_compat import FUSED_TOLERANCE
from mnist_peft.model.mlp import MnistMLP, base_fingerprint
from mnist_peft.serving.forward import mixed_forward
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel, set_forward_mode
from mnist_peft.tuners.lora.targets import lora_layers

_exact = exact_forward


def _add(model: LoraModel, name: str, seed: int, **kw) -> None:
    torch.manual_seed(seed)
    model.add_adapter(name, LoraConfig(init_lora_weights=False, **{"r": 4, "lora_alpha": 8, **kw}))


@pytest.fixture()
def abd(random_base: MnistMLP) -> LoraModel:
    model = LoraModel(copy.deepcopy(random_base))
    for i, name in enumerate("abd"):
        _add(model, name, i)
    return model.eval()


def test_remerging_another_adapter_computes_with_the_new_one(abd: LoraModel) -> None:
    """Finding 1: a reused merge buffer left the fused path computing with the old adapter."""
    x = torch.randn(16, 784)
    abd.set_adapter(["a", "b"])
    abd.merge(["a"])
    with torch.no_grad():
        abd(x)
    abd.unmerge()
    abd.set_adapter(["d", "b"])
    abd.merge(["d"])
    with torch.no_grad():
        fused = abd(x)
    reference = copy.deepcopy(abd)
    reference.unmerge()
    expected = _exact(reference, x)  # d and b, unmerged, peft's op order
    reference.set_adapter(["a", "b"])
    stale = _exact(reference, x)  # what the stale cache computed
    assert (expected - stale).abs().max() > 1e-2  # the two answers differ, so the check can fail
    torch.testing.assert_close(fused, expected, rtol=0, atol=FUSED_TOLERANCE)


@pytest.fixture()
def full_and_l3(random_base: MnistMLP) -> LoraModel:
    model = LoraModel(copy.deepcopy(random_base))
    _add(model, "full", 1)
    _add(model, "l3", 2, target_modules=["linear3"])
    return model.eval()


def test_adapters_on_different_layers_stack_merge_and_unload(full_and_l3: LoraModel) -> None:
    """Finding 2: model-level state was read from the first layer, which does not hold ``l3``."""
    model, x = full_and_l3, torch.randn(16, 784)
    model.set_adapter(["full", "l3"])
    assert model.active_adapters == ["full", "l3"]
    stacked = _exact(model, x)
    model.set_adapter("full")
    assert (stacked - _exact(model, x)).abs().max() > 1e-2  # l3 matters
    model.set_adapter(["full", "l3"])
    plain = copy.deepcopy(model).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), stacked, rtol=0, atol=1e-4)
    model.merge(["l3"])
    assert model.merged_adapters == ["l3"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), stacked, rtol=0, atol=1e-4)  # l3 once, from the weight
    with pytest.raises(AdapterStateError, match="merged"):
        mixed_forward(model, x, ["l3"] * 16)  # would apply l3 twice


def test_cli_merge_of_adapters_on_different_layers_keeps_both(full_and_l3: LoraModel, tmp_path) -> None:
    """Finding 2, end to end: ``mnist-peft merge`` wrote the same bytes as ``full`` alone."""
    base = tmp_path / "base"
    plain = copy.deepcopy(full_and_l3).unload()
    plain.save_pretrained(base)
    save_adapter(full_and_l3, tmp_path / "full", "full")
    save_adapter(full_and_l3, tmp_path / "l3only", "l3")
    outs = {}
    for label, adapters in {"full": ["full"], "both": ["full", "l3only"]}.items():
        args = [a for name in adapters for a in ("--adapter", str(tmp_path / name))]
        result = run_cli("merge", "--base", str(base), *args, "--out", str(tmp_path / f"merged-{label}"))
        assert result.returncode == 0, result.stderr
        outs[label] = MnistMLP.from_pretrained(tmp_path / f"merged-{label}")
    x = torch.randn(8, 784)
    full_and_l3.set_adapter(["full", "l3"])
    with torch.no_grad():
        assert not torch.equal(outs["full"].linear3.weight, outs["both"].linear3.weight)
        torch.testing.assert_close(outs["both"](x), full_and_l3(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("edit", ["lora_B", "base_weight", "base_bias"])
def test_in_place_edits_through_data_reach_the_fused_path(abd: LoraModel, edit: str) -> None:
    """Finding 3: ``.data`` edits do not bump ``_version``, so a version-keyed cache went stale."""
    x = torch.randn(16, 784)
    with torch.no_grad():
        before = abd(x)  # builds the fused layout
    layer = abd.model.linear2
    if edit == "lora_B":
        layer.lora_B["a"].data.mul_(10)
    elif edit == "base_weight":
        layer.base_layer.weight.data.add_(0.01)
    else:
        layer.base_layer.bias.data.add_(1)
    with torch.no_grad():
        after = abd(x)
    expected = _exact(abd, x)
    assert (expected - before).abs().max() > 1e-2  # the edit matters
    torch.testing.assert_close(after, expected, rtol=0, atol=FUSED_TOLERANCE)


def test_base_fingerprint_follows_data_edits_and_save_records_the_new_base(abd: LoraModel, tmp_path) -> None:
    """Finding 3: a cached fingerprint made ``save_adapter`` record a base that no longer existed."""
    first = abd.base_fingerprint()
    abd.model.linear1.base_layer.weight.data.add_(1)
    assert abd.base_fingerprint() != first
    assert abd.base_fingerprint() == base_fingerprint(copy.deepcopy(abd).unload())
    save_adapter(abd, tmp_path / "a", "a")
    assert read_adapter(tmp_path / "a").base_fingerprint == abd.base_fingerprint()


def test_unmerge_keeps_a_base_edit_made_while_merged(abd: LoraModel) -> None:
    """Finding 4: unmerge put the original tensor back and silently dropped the edit."""
    abd.set_adapter("a")
    original = abd.model.linear1.base_layer.weight.detach().clone()
    abd.merge()
    abd.model.linear1.base_layer.weight.data.add_(0.5)
    abd.unmerge()
    torch.testing.assert_close(abd.model.linear1.base_layer.weight.detach(), original + 0.5, rtol=0, atol=1e-5)
    # and with no edit, unmerge stays bit-exact
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(abd.model)}
    abd.merge()
    abd.unmerge()
    assert all(torch.equal(before[n], layer.base_layer.weight) for n, layer in lora_layers(abd.model))


@pytest.mark.parametrize("touch", ["read_data", "deepcopy", "forward"])
def test_unmerge_stays_bit_exact_after_touches_that_edit_nothing(abd: LoraModel, touch: str) -> None:
    """Reading ``.data``, copying the model or running the fused path (which re-points the weight
    into its buffers) sends unmerge down its checking path; with no edit it still restores exactly."""
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(abd.model)}
    abd.merge()
    if touch == "read_data":
        abd.model.linear2.base_layer.weight.data.sum()
    elif touch == "deepcopy":
        copy.deepcopy(abd)
    else:
        with torch.no_grad():
            abd(torch.randn(4, 784))
    abd.unmerge()
    assert all(torch.equal(before[n], layer.base_layer.weight) for n, layer in lora_layers(abd.model))


def test_unmerged_model_hands_back_plain_parameters(abd: LoraModel) -> None:
    plain = copy.deepcopy(abd).merge_and_unload()
    assert all(type(p) is torch.nn.Parameter for p in plain.parameters())
    assert all(isinstance(layer.base_layer.weight, torch.nn.Parameter) for _, layer in lora_layers(abd.model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_mixed_batch_follows_the_model_dtype(abd: LoraModel, dtype: torch.dtype) -> None:
    """Finding 4: mixed batches failed on bf16/fp16 models."""
    model = abd.to(dtype)
    x = torch.randn(6, 784, dtype=dtype)
    rows = ["a", None, "__base__", "d", "b", "a"]
    y = mixed_forward(model, x, rows)
    assert y.dtype == dtype
    tolerance = {torch.bfloat16: 0.1, torch.float16: 0.02, torch.float64: 1e-9}[dtype]
    for i, name in enumerate(rows):
        if name in (None, "__base__"):
            with model.disable_adapter(), torch.no_grad():
                alone = model(x[i : i + 1])
        else:
            model.set_adapter(name)
            alone = _exact(model, x[i : i + 1])
        torch.testing.assert_close(y[i : i + 1], alone, rtol=0, atol=tolerance * max(1.0, float(alone.abs().max())))


def test_mixed_batch_honours_disable_adapter(abd: LoraModel) -> None:
    x = torch.randn(4, 784)
    with abd.disable_adapter(), torch.no_grad():
        base = abd(x)
        assert torch.equal(mixed_forward(abd, x, ["a", "b", "d", "a"]), base)
    assert not torch.equal(mixed_forward(abd, x, ["a", "b", "d", "a"]), base)


def test_refused_load_stack_leaves_the_callers_base_trainable(random_base: MnistMLP, abd: LoraModel, tmp_path) -> None:
    """Finding 4: a refused ``load_stack`` had already frozen the caller's base."""
    save_adapter(abd, tmp_path / "a", "a")
    other = copy.deepcopy(random_base)
    with torch.no_grad():
        other.linear1.weight.add_(1)  # another base: the fingerprint check refuses
    assert all(p.requires_grad for p in other.parameters())
    with pytest.raises(FingerprintMismatchError):
        load_stack(other, [tmp_path / "a"])
    assert all(p.requires_grad for p in other.parameters())
    assert type(other.linear1) is torch.nn.Linear


# ----------------------------------------------------------------------------- found by an adversarial review
@pytest.mark.parametrize("fused_optimizer", [True, False])
def test_an_optimizer_step_on_the_base_while_merged_survives_unmerge(abd: LoraModel, fused_optimizer: bool) -> None:
    """Fused optimizers step without bumping ``_version``; unmerge must still keep the step."""
    w = abd.model.linear2.base_layer.weight
    original = w.detach().clone()
    abd.set_adapter("a")
    abd.merge()
    merged = w.detach().clone()
    w.requires_grad_(True)
    opt = torch.optim.Adam([w], lr=0.1, fused=fused_optimizer)
    abd.train()
    abd(torch.randn(4, 784)).sum().backward()
    opt.step()
    abd.eval()
    w.requires_grad_(False)
    w.grad = None
    stepped = w.detach().clone()
    assert not torch.equal(stepped, merged)  # the step did something
    abd.unmerge()
    torch.testing.assert_close(w.detach(), original + (stepped - merged), rtol=0, atol=1e-6)


def test_a_data_handle_kept_from_an_earlier_merge_never_aliases_a_later_live_weight(abd: LoraModel) -> None:
    w = abd.model.linear2.base_layer.weight
    original = w.detach().clone()
    abd.merge()
    handle = w.data
    abd.unmerge()
    abd.merge()
    assert handle.data_ptr() != w.data_ptr()
    handle.add_(1.0)  # writes only the stale tensor
    abd.unmerge()
    assert torch.equal(w.detach(), original)


def test_state_dict_taken_while_merged_is_not_overwritten_by_a_later_merge(abd: LoraModel) -> None:
    from mnist_peft.serving.forward import hot_swap

    hot_swap(abd, "a")
    taken = abd.state_dict()["model.linear2.base_layer.weight"]
    copy_of_taken = taken.clone()
    hot_swap(abd, "b")
    assert torch.equal(taken, copy_of_taken)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 3e38])
def test_an_unused_adapter_cannot_poison_the_fused_path_or_other_rows(abd: LoraModel, poison: float) -> None:
    x = torch.randn(5, 784)
    abd.set_adapter("a")
    expected = _exact(abd, x)
    with torch.no_grad():
        abd.model.linear1.lora_A["b"].fill_(poison)  # b: loaded, not active
        fused = abd(x)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused, expected, rtol=0, atol=FUSED_TOLERANCE)
    rows = mixed_forward(abd, x, ["a", None, "d", "b", "a"])
    assert torch.isfinite(rows[[0, 1, 2, 4]]).all()  # only b's own row may be non-finite


def test_merging_a_name_twice_is_refused(abd: LoraModel) -> None:
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(abd.model)}
    with pytest.raises(AdapterStateError, match="repeat"):
        abd.merge(["a", "a"])
    assert abd.merged_adapters == [] and all(torch.equal(before[n], layer.base_layer.weight) for n, layer in lora_layers(abd.model))


def test_parameters_stay_ordinary_tensors_after_a_fused_forward(abd: LoraModel, tmp_path) -> None:
    from torch.nn.utils import parameters_to_vector

    before = parameters_to_vector(abd.parameters()).clone()
    with torch.no_grad():
        abd(torch.randn(2, 784))  # re-points W and A into the fused buffers
    assert torch.equal(parameters_to_vector(abd.parameters()), before)
    torch.save(abd.lora_state_dict("a"), tmp_path / "a.pt")
    raw = sum(t.numel() * t.element_size() for t in abd.lora_state_dict("a").values())
    assert (tmp_path / "a.pt").stat().st_size < raw + 4096  # not the shared buffer with the base in it


def test_hooks_on_the_base_layer_are_honoured(abd: LoraModel) -> None:
    from torch.nn.utils import prune

    layer, h = abd.model.linear2, torch.randn(3, 1000)
    with torch.no_grad():
        unpruned = layer(h)
    prune.l1_unstructured(layer.base_layer, "weight", amount=0.5)  # the weight is now made by a pre-hook
    with torch.no_grad():
        auto = layer(h)
    set_forward_mode(abd, "exact")
    with torch.no_grad():
        exact = layer(h)
    assert (auto - unpruned).abs().max() > 1e-3  # pruning matters
    assert torch.equal(auto, exact)  # the hook sends the layer down the exact path

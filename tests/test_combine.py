"""Combining adapters (cat, svd), resizing, LoRA from dense deltas; peft's cat as the reference."""

from __future__ import annotations

import copy

import pytest
import torch

from mnist_peft.errors import AdapterConfigError, FingerprintMismatchError
from mnist_peft.io.adapters import AdapterFiles
from mnist_peft.merging.combine import combine_adapters, lora_from_deltas, resize_adapter
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.tuners.lora.config import LoraConfig, compute_scaling
from mnist_peft.tuners.lora.layer import get_delta_weight
from mnist_peft.tuners.lora.model import LoraModel

# Sums of float32 products of unit-scale factors, regrouped: agreement to ~1e-6 relative.
COMBINE_TOLERANCE = 1e-5


def _adapter(base: MnistMLP, r: int, alpha: float, seed: int, fp: str = "fp") -> AdapterFiles:
    torch.manual_seed(seed)
    model = LoraModel(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False))
    return AdapterFiles(model.peft_config["default"], model.lora_state_dict(), {"base_fingerprint": fp})


def _delta(files: AdapterFiles, module: str) -> torch.Tensor:
    c = files.config
    return get_delta_weight(
        files.state_dict[f"{module}.lora_A.weight"],
        files.state_dict[f"{module}.lora_B.weight"],
        compute_scaling(c.r, c.lora_alpha, c.use_rslora),
    )


MODULES = ("linear1", "linear2", "linear3")


def test_cat_equals_the_weighted_sum_of_deltas(random_base) -> None:
    a, b = _adapter(random_base, 2, 4, 1), _adapter(random_base, 3, 3, 2)
    res = combine_adapters([a, b], [0.5, -2.0], method="cat")
    assert res.config.r == 5 and res.config.lora_alpha == 5
    out = res.to_files()
    for m in MODULES:
        expected = 0.5 * _delta(a, m) - 2.0 * _delta(b, m)
        assert _delta(a, m).abs().max() > 1e-3
        torch.testing.assert_close(_delta(out, m), expected, rtol=COMBINE_TOLERANCE, atol=COMBINE_TOLERANCE)
    assert out.base_fingerprint == "fp"


def test_cat_matches_peft_add_weighted_adapter_cat(random_base) -> None:
    import peft

    from mnist_peft.io.peft_compat import to_peft_config

    a, b = _adapter(random_base, 2, 4, 1), _adapter(random_base, 4, 8, 2)
    theirs = peft.get_peft_model(copy.deepcopy(random_base), to_peft_config(a.config), adapter_name="one")
    theirs.add_adapter("two", to_peft_config(b.config))
    with torch.no_grad():
        for name, files in (("one", a), ("two", b)):
            for m in MODULES:
                layer = theirs.base_model.model.get_submodule(m)
                layer.lora_A[name].weight.copy_(files.state_dict[f"{m}.lora_A.weight"])
                layer.lora_B[name].weight.copy_(files.state_dict[f"{m}.lora_B.weight"])
    theirs.add_weighted_adapter(["one", "two"], [0.7, 1.3], "mix", combination_type="cat")
    ours = combine_adapters([a, b], [0.7, 1.3], method="cat").to_files()
    for m in MODULES:
        peft_delta = theirs.base_model.model.get_submodule(m).get_delta_weight("mix")
        torch.testing.assert_close(_delta(ours, m), peft_delta.detach(), rtol=COMBINE_TOLERANCE, atol=COMBINE_TOLERANCE)


def test_svd_is_exact_at_full_rank_and_degrades_monotonically(random_base) -> None:
    a, b = _adapter(random_base, 2, 2, 1), _adapter(random_base, 2, 2, 2)
    exact = combine_adapters([a, b], method="cat").to_files()
    full = combine_adapters([a, b], method="svd", r=4)
    assert max(full.relative_error.values()) < 1e-6
    for m in MODULES:
        torch.testing.assert_close(_delta(full.to_files(), m), _delta(exact, m), rtol=COMBINE_TOLERANCE, atol=COMBINE_TOLERANCE)
    errors = [combine_adapters([a, b], method="svd", r=k).relative_error["linear2"] for k in (4, 3, 2, 1)]
    assert errors == sorted(errors) and errors[-1] > 0.1
    # the reported error is the real one
    k2 = combine_adapters([a, b], method="svd", r=2).to_files()
    real = float((_delta(k2, "linear2") - _delta(exact, "linear2")).norm() / _delta(exact, "linear2").norm())
    assert abs(real - errors[2]) < 1e-4


def test_resize_and_lora_from_deltas(random_base) -> None:
    a = _adapter(random_base, 8, 8, 3)
    small = resize_adapter(a, 2)
    assert small.config.r == 2 and small.state_dict["linear1.lora_A.weight"].shape == (2, 784)
    torch.manual_seed(0)
    low_rank = torch.randn(50, 3) @ torch.randn(3, 40)  # rank 3
    res = lora_from_deltas({"linear1": low_rank}, 3)
    out = res.to_files()
    torch.testing.assert_close(_delta(out, "linear1"), low_rank, rtol=1e-4, atol=1e-4)
    assert lora_from_deltas({"linear1": low_rank}, 1).relative_error["linear1"] > 0.1


def test_combined_adapter_loads_in_stock_peft(random_base, tmp_path) -> None:
    import peft

    from mnist_peft.io.adapters import write_adapter

    a, b = _adapter(random_base, 2, 4, 1), _adapter(random_base, 2, 4, 2)
    res = combine_adapters([a, b], [1.0, 1.0], method="svd", r=3)
    write_adapter(res.to_files(), tmp_path / "c")
    random_base.save_pretrained(tmp_path / "base")
    theirs = peft.PeftModel.from_pretrained(MnistMLP.from_pretrained(tmp_path / "base"), str(tmp_path / "c"))
    assert theirs.base_model.model.linear2.lora_A["default"].weight.shape == (3, 1000)


def test_bad_combinations_are_refused(random_base) -> None:
    a = _adapter(random_base, 2, 2, 1)
    with pytest.raises(AdapterConfigError, match="needs a target rank"):
        combine_adapters([a], method="svd")
    with pytest.raises(AdapterConfigError, match="one --weight"):
        combine_adapters([a], [1.0, 2.0])
    with pytest.raises(FingerprintMismatchError):
        combine_adapters([a, _adapter(random_base, 2, 2, 2, fp="other")])

"""MnistMLP: size, shapes, Hub-mixin round trip, fingerprint, peft wrapping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mnist_peft.errors import ModelLoadError
from mnist_peft.model.mlp import MnistMLP, base_fingerprint, count_parameters, load_base


def test_default_model_has_the_seed_parameter_count() -> None:
    model = MnistMLP()
    assert count_parameters(model) == 2_807_010
    assert [n for n, _ in model.named_children()] == ["linear1", "linear2", "linear3", "relu"]


def test_forward_shapes_accept_flat_and_image_batches(random_base: MnistMLP) -> None:
    assert random_base(torch.zeros(3, 784)).shape == (3, 10)
    assert random_base(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    small = MnistMLP(hidden_size_1=16, hidden_size_2=8)
    assert count_parameters(small) == 784 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10


def test_save_pretrained_round_trip_is_bit_exact(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = MnistMLP(hidden_size_1=32, hidden_size_2=16)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    loaded = MnistMLP.from_pretrained(tmp_path)
    assert loaded.linear1.out_features == 32  # the config carried the sizes
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


def test_fingerprint_is_stable_across_save_load_and_changes_with_weights(tmp_path: Path, random_base: MnistMLP) -> None:
    fp = base_fingerprint(random_base)
    random_base.save_pretrained(tmp_path)
    assert base_fingerprint(load_base(tmp_path)) == fp
    with torch.no_grad():
        random_base.linear3.bias[0] += 1e-6
    assert base_fingerprint(random_base) != fp


def test_load_base_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_base(tmp_path)


def test_loading_is_strict_about_missing_tensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    MnistMLP(hidden_size_1=8, hidden_size_2=8).save_pretrained(tmp_path)
    save_file({"linear1.weight": torch.zeros(8, 784)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"linear1\.bias|Missing"):
        load_base(tmp_path)


def test_peft_get_peft_model_wraps_and_trains(random_base: MnistMLP, mnist_train) -> None:
    import peft

    model = peft.get_peft_model(random_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["linear1", "linear2", "linear3"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * (784 + 1000) + 4 * (1000 + 2000) + 4 * (2000 + 10)
    x, y = mnist_train.x[:512], mnist_train.y[:512]
    opt = torch.optim.Adam(trainable, lr=1e-2)
    first = None
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first

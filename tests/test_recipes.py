"""Per-digit adapter recipes on the bundled MNIST (small, fast configurations)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mnist_peft.errors import FingerprintMismatchError
from mnist_peft.model.mlp import load_base
from mnist_peft.training.recipes import ADAPTER_RECIPES, train_adapter


@pytest.fixture(scope="module")
def base(trained_base_dir: Path):
    return load_base(trained_base_dir)


@pytest.mark.slow
def test_seed_recipe_fixes_its_digit_and_forgets_the_others(base, data_root) -> None:
    recipe = ADAPTER_RECIPES["seed"]
    assert (recipe.r, recipe.lora_alpha, recipe.batch_size, recipe.steps, recipe.digit_fraction) == (1, 1, 10, 100, 1.0)
    model, result = train_adapter(base, 9, "seed", data_dir=str(data_root))
    assert model.num_lora_parameters() == 6_794
    assert result.after.wrong_per_digit[9] < result.before.wrong_per_digit[9] * 0.5
    assert result.after.accuracy < result.before.accuracy - 0.05  # the seed's catastrophic forgetting
    with model.disable_adapter():
        from mnist_peft.training.loop import evaluate

        assert evaluate(model, data_dir=str(data_root)).confusion == result.before.confusion


REPO = Path(__file__).resolve().parent.parent


# What the replay recipe holds on the committed default base, for any digit and seed: it never
# makes its digit worse, and overall accuracy drops by a bounded amount (the README measures
# 0.00-0.14 points over all ten digits with seed 0; this allows about twice that). A 20% cut of the
# digit's errors is NOT guaranteed: digits 0 and 5 missed it (16 -> 15 and similar) in this test.
REFERENCE_MAX_ACCURACY_DROP = 0.003


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("digit", [0, 5, 9])  # spread over the digits, fixed in advance
def test_replay_recipe_on_the_reference_base_cuts_the_digit_with_a_bounded_trade(data_root, digit: int, seed: int) -> None:
    base = load_base(REPO / "adapters" / "base" / "v1")
    _, result = train_adapter(base, digit, "replay", data_dir=str(data_root), seed=seed)
    before, after = result.before.wrong_per_digit[digit], result.after.wrong_per_digit[digit]
    assert after <= before, (before, after)
    assert result.after.accuracy >= result.before.accuracy - REFERENCE_MAX_ACCURACY_DROP


# On the half-epoch test base, 60 steps trade some overall accuracy for the digit on most digits
# (up to 0.5 points; up to 0.14 on the default base, README); the seed recipe loses 5+. This bounds it.
REPLAY_MAX_ACCURACY_DROP = 0.005


@pytest.mark.slow
def test_replay_recipe_briefly_trained_bounds_its_accuracy_trade_far_below_the_seed_recipe(base, data_root) -> None:
    _, seed = train_adapter(base, 8, "seed", data_dir=str(data_root))
    _, result = train_adapter(base, 8, "replay", data_dir=str(data_root), steps=60, val_size=0)
    assert result.after.wrong_per_digit[8] <= 0.6 * result.before.wrong_per_digit[8]
    assert result.after.accuracy >= result.before.accuracy - REPLAY_MAX_ACCURACY_DROP
    assert seed.after.accuracy < result.after.accuracy - 0.02  # forgetting-free next to the seed's recipe


@pytest.mark.slow
def test_resume_starts_from_the_saved_adapter_and_trains_on(base, data_root, tmp_path: Path) -> None:
    """``--resume`` is an incremental update: it starts from the saved weights (not a fresh init)
    with a fresh optimizer, then trains. The optimizer state is not saved in an adapter folder, so
    N + M resumed steps are not N + M straight ones; what resume promises is tested here."""
    import torch

    from mnist_peft.io.adapters import save_adapter

    model, _ = train_adapter(base, 8, "replay", data_dir=str(data_root), steps=10, val_size=0)
    save_adapter(model, tmp_path / "a")
    saved = model.lora_state_dict()
    # An lr far below float resolution: the run leaves the weights where it started.
    still, _ = train_adapter(base, 8, "replay", data_dir=str(data_root), steps=3, val_size=0, lr=1e-30, resume=tmp_path / "a")
    fresh, _ = train_adapter(base, 8, "replay", data_dir=str(data_root), steps=3, val_size=0, lr=1e-30)
    for key, value in saved.items():
        torch.testing.assert_close(still.lora_state_dict()[key], value, rtol=0, atol=1e-25)  # started from the saved adapter
    assert float(fresh.lora_state_dict()["linear2.lora_B.weight"].abs().max()) < 1e-25  # a fresh start: B ~ 0
    assert float(saved["linear2.lora_B.weight"].abs().max()) > 1e-3  # ... which the saved adapter is not
    # With the recipe's lr, resuming moves on from there.
    resumed, second = train_adapter(base, 8, "replay", data_dir=str(data_root), steps=10, val_size=0, resume=tmp_path / "a")
    moved = resumed.lora_state_dict()["linear2.lora_B.weight"] - saved["linear2.lora_B.weight"]
    assert float(moved.abs().max()) > 1e-4
    assert second.before.accuracy == evaluate_base_accuracy(base, data_root)  # "before" is always the base


def evaluate_base_accuracy(base, data_root: Path) -> float:
    from mnist_peft.training.loop import evaluate

    return evaluate(base, data_dir=str(data_root)).accuracy


def test_resume_onto_another_base_is_refused(base, data_root, tmp_path: Path, random_base) -> None:
    from mnist_peft.io.adapters import save_adapter

    model, _ = train_adapter(base, 1, "replay", data_dir=str(data_root), steps=2, val_size=0)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(FingerprintMismatchError):
        train_adapter(random_base, 1, "replay", data_dir=str(data_root), steps=2, val_size=0, resume=tmp_path / "a")


def test_augmentation_keeps_shape_and_background_and_is_seeded(mnist_test) -> None:
    import torch

    from mnist_peft.model.data import MNIST_MEAN, MNIST_STD
    from mnist_peft.training.augment import augment_batch

    x = mnist_test.x[:64]
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, x)
    background = -MNIST_MEAN / MNIST_STD  # a black pixel, normalised
    corners = a.reshape(64, 28, 28)[:, 0, 0]
    assert torch.allclose(corners, torch.full_like(corners, background), atol=1e-5)
    assert abs(float(a.mean()) - float(x.mean())) < 0.1  # the same images, moved a little

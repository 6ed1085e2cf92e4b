"""Training loops and evaluation on the bundled MNIST."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mnist_peft.model.data import MnistSplit
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.training.loop import TrainConfig, evaluate, fit
from mnist_peft.training.recipes import BASE_RECIPES, train_base

SHORT_RUN_ACCURACY = 0.90  # 10k images, 2 epochs at batch 128: measured ~0.93 on the test set


def test_short_training_run_on_real_mnist_reaches_stated_accuracy(mnist_train, mnist_test) -> None:
    torch.manual_seed(0)
    model = MnistMLP()
    subset = MnistSplit(mnist_train.x[:10_000], mnist_train.y[:10_000])
    fit(model, subset, TrainConfig(epochs=2, batch_size=128, lr=2e-3))
    assert evaluate(model, mnist_test).accuracy >= SHORT_RUN_ACCURACY


def test_training_is_deterministic_given_the_seed(data_root) -> None:
    a, _ = train_base("default", data_dir=str(data_root), epochs=0.02, seed=5)
    b, _ = train_base("default", data_dir=str(data_root), epochs=0.02, seed=5)
    c, _ = train_base("default", data_dir=str(data_root), epochs=0.02, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.linear1.weight, c.linear1.weight)


def test_early_stopping_restores_the_best_validation_state(mnist_train) -> None:
    torch.manual_seed(0)
    model = MnistMLP()
    train = MnistSplit(mnist_train.x[:2000], mnist_train.y[:2000])
    val = MnistSplit(mnist_train.x[2000:2500], mnist_train.y[2000:2500])
    # A learning rate this high diverges after the first checks, so training must stop early.
    result = fit(model, train, TrainConfig(epochs=50, batch_size=100, lr=0.05, schedule="none", patience=2, eval_every=5), val=val)
    assert result.stopped_early and result.steps < 50 * 20
    assert evaluate(model, val).accuracy == pytest.approx(result.best_val_accuracy)


class _Constant(nn.Module):
    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 10)
        out[:, self.label] = 1.0
        return out


def test_evaluate_counts_per_digit_errors_and_confusion(mnist_test) -> None:
    result = evaluate(_Constant(3), mnist_test)
    counts = torch.bincount(mnist_test.y, minlength=10).tolist()
    assert result.n == 10_000
    assert result.wrong_per_digit == [0 if d == 3 else c for d, c in enumerate(counts)]
    assert result.accuracy == counts[3] / 10_000
    assert result.error_rate_per_digit[3] == 0.0 and result.error_rate_per_digit[0] == 1.0
    assert [row[3] for row in result.confusion] == counts


def test_recipes_are_the_seed_and_ours() -> None:
    seed = BASE_RECIPES["seed"].config
    assert (seed.batch_size, seed.epochs, seed.lr, seed.seed, seed.schedule) == (10, 1, 1e-3, 0, "none")
    with pytest.raises(ValueError, match="unknown base recipe 'fast'; choose one of seed, default"):
        train_base("fast")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_a_registered_recipe_becomes_a_cli_choice() -> None:
    """Adding a recipe is one call: the CLI's --recipe choices are read from the recipe registry."""
    from mnist_peft.cli.main import build_parser
    from mnist_peft.training.recipes import _RECIPES, BaseRecipe, register_recipe

    recipe = register_recipe(BaseRecipe("tiny-test", "a test's own", TrainConfig(epochs=0.01, batch_size=256)))
    try:
        args = build_parser().parse_args(["train-base", "--recipe", "tiny-test", "--out", "x"])
        assert args.recipe == "tiny-test"
        with pytest.raises(ValueError, match="exists already"):
            register_recipe(recipe)
    finally:
        del _RECIPES["base"]["tiny-test"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-base", "--recipe", "tiny-test", "--out", "x"])


def test_a_recipe_training_cannot_read_is_refused_when_registered() -> None:
    from dataclasses import dataclass

    from mnist_peft.training.recipes import recipe_names, register_recipe

    @dataclass
    class OnlyTheProtocol:
        name: str = "shapeless"
        kind: str = "base"
        summary: str = "has the protocol's fields, but no TrainConfig"

    with pytest.raises(ValueError, match="must be a BaseRecipe"):
        register_recipe(OnlyTheProtocol())  # type: ignore[arg-type]
    assert "shapeless" not in recipe_names("base")
    with pytest.raises(ValueError, match="recipe kind must be"):
        recipe_names("bogus")  # type: ignore[arg-type]

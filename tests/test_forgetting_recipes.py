"""The forgetting recipes (issue: adapters that fix their digit without hurting the others): elastic
distortions of the digit's own images, the null-space projection of the adapter's A, and both;
each a named recipe behind the recipe seam, the same in the batched trainer as alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import REPO

from mnist_peft.errors import TrainConfigError
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD, load_mnist, split_validation
from mnist_peft.model.mlp import load_base
from mnist_peft.training.augment import elastic_batch, gaussian_kernel
from mnist_peft.training.batched import AdapterJob, train_batched
from mnist_peft.training.nullspace import covariances, null_space, output_bounds, project_
from mnist_peft.training.recipes import AdapterRecipe, get_recipe, recipe_names, train_adapter
from mnist_peft.training.task import DigitTask
from mnist_peft.tuners.lora.targets import lora_layers

BASE = REPO / "adapters" / "base" / "v1"


def test_the_forgetting_recipes_are_registered_by_name_with_their_one_change_each() -> None:
    names = recipe_names("adapter")
    for name in ("replay-affine", "elastic", "null-space", "elastic-null-space"):
        assert name in names
    replay = get_recipe("adapter", "replay")
    changed = {
        name: {k for k, v in vars(get_recipe("adapter", name)).items() if v != vars(replay)[k] and k not in ("name", "summary")}
        for name in ("replay-affine", "elastic", "null-space", "elastic-null-space")
    }
    assert changed == {
        "replay-affine": {"distortion"},
        "elastic": {"distortion", "elastic_alpha"},
        "null-space": {"null_space_energy"},
        "elastic-null-space": {"distortion", "elastic_alpha", "null_space_energy"},
    }  # the same rank, steps, batches and budget as replay: one change each (and its value chosen on validation)
    assert (get_recipe("adapter", "elastic").elastic_alpha, get_recipe("adapter", "null-space").null_space_energy) == (8.0, 0.9)
    for bad in ({"distortion": "swirl"}, {"null_space_energy": 1.0}, {"elastic_alpha": 0.0}, {"elastic_sigma": 50.0}):
        with pytest.raises(TrainConfigError):
            AdapterRecipe(**bad)
    with pytest.raises(TrainConfigError, match="for LoRA adapters"):  # DoRA's magnitudes move whole rows: no bound
        AdapterRecipe(null_space_energy=0.9, use_dora=True)


def test_the_held_out_split_is_the_same_images_for_the_study_base_and_every_adapter(mnist_train) -> None:
    """The study's honesty rests on it: ``split_validation(seed 0)`` (the study base, a solo adapter) and
    the batched trainer's own draw hold out the same 5,000 images, and train on none of them."""
    from mnist_peft.model.data import split_validation

    n = len(mnist_train)
    train, val = split_validation(mnist_train, 5000, seed=0)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # as batched._new_job draws it
    assert torch.equal(mnist_train.x[perm[:5000]], val.x) and torch.equal(mnist_train.x[perm[5000:]], train.x)
    assert len(set(perm[:5000].tolist()) & set(perm[5000:].tolist())) == 0


def test_an_elastic_distortion_is_seeded_smooth_and_keeps_the_ink(mnist_test) -> None:
    x = mnist_test.x[:64]
    a = elastic_batch(x, torch.Generator().manual_seed(0))
    b = elastic_batch(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # the generator decides every draw
    assert not torch.equal(a, elastic_batch(x, torch.Generator().manual_seed(1)))
    pix = lambda t: t * MNIST_STD + MNIST_MEAN  # noqa: E731
    assert pix(a).min() >= -1e-6 and pix(a).max() <= 1 + 1e-6
    moved = (pix(a) - pix(x)).abs().mean(1)
    assert (moved > 0.01).all()  # every image changed
    base = load_base(BASE)
    with torch.no_grad():
        clean = float((base(mnist_test.x[:1000]).argmax(1) == mnist_test.y[:1000]).float().mean())
        bent = float(
            (base(elastic_batch(mnist_test.x[:1000], torch.Generator().manual_seed(0))).argmax(1) == mnist_test.y[:1000]).float().mean()
        )
    assert 0.7 < bent < clean - 0.02  # new to the base (measured 0.79 vs 0.98 at Simard's alpha 34, sigma 4), yet mostly its digit
    tiny = elastic_batch(x, torch.Generator().manual_seed(0), alpha=1e-3)
    assert (pix(tiny) - pix(x)).abs().max() < 1e-3  # no displacement, no change (bilinear at pixel centres)
    k = gaussian_kernel(4.0)
    assert k.numel() == 17 and abs(float(k.sum()) - 1) < 1e-6 and torch.equal(k, k.flip(0))


def test_only_the_digits_own_images_are_distorted_and_the_replayed_ones_stay(mnist_train) -> None:
    recipe = AdapterRecipe(distortion="elastic")
    task = DigitTask(recipe, 9, mnist_train, torch.nn.Identity(), torch.Generator().manual_seed(0))
    idx = next(task.batches(0))
    xb, yb = mnist_train.x[idx], mnist_train.y[idx]
    out = task.inputs(xb, yb)
    mine = yb == 9
    assert mine.sum() > 0 and (~mine).sum() > 0
    assert torch.equal(out[~mine], xb[~mine])
    assert ((out[mine] - xb[mine]).abs().mean(1) > 0).all()


def test_a_null_space_projector_keeps_out_the_energy_asked() -> None:
    """On a toy covariance with a known spectrum (fast); the real layers are in the recipe's test."""
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    spectrum = torch.tensor([2.0**-i for i in range(40)], dtype=torch.float64)  # halves each time
    covs = {"layer": q @ torch.diag(spectrum) @ q.t()}
    space = null_space(covs, 0.99)
    assert space.kept_out["layer"] == 7  # 1 - 2**-7 = 0.992 is the first share >= 0.99 (of the total, ~2)
    u = q[:, :7].float()
    assert torch.allclose(space.projectors["layer"] @ u, torch.zeros_like(u), atol=1e-5)  # the top directions are kept out
    for name, p in space.projectors.items():
        assert torch.allclose(p, p.t(), atol=1e-6) and torch.allclose(p @ p, p, atol=1e-4)  # an orthogonal projector
        assert space.residual[name] <= 0.01 + 1e-9 and 0 < space.kept_out[name] < p.shape[0]
    assert space.kept_out == null_space(covs, 0.99).kept_out and all(
        null_space(covs, 0.9).kept_out[n] <= space.kept_out[n] for n in space.kept_out
    )  # less energy kept out: fewer directions
    with pytest.raises(TrainConfigError, match=r"\(0, 1\)"):
        null_space(covs, 1.0)


@pytest.mark.slow
def test_the_null_space_recipe_keeps_A_in_the_allowed_directions_and_reports_change_within_its_bound(data_root: Path) -> None:
    base = load_base(BASE)
    model, result = train_adapter(base, 9, "null-space", data_dir=str(data_root), steps=30, eval_every=10)
    report = result.null_space
    assert report is not None and set(report) == {"linear1", "linear2", "linear3"}
    for name, row in report.items():
        assert 0 <= row["change"] <= row["bound"] + 1e-9, (name, row)  # measured on the other digits' test images
        assert row["residual"] <= 1 - get_recipe("adapter", "null-space").null_space_energy + 1e-9
    assert "null_space" in result.metrics()
    # the A's rows lie in the allowed directions: projecting them again changes nothing
    before = {n: layer.lora_A["default"].detach().clone() for n, layer in lora_layers(model)}
    assert all(a.abs().max() > 0 for a in before.values())
    train, _ = split_validation(load_mnist(train=True, data_dir=str(data_root)), 5000, seed=0)  # the run's own split
    space = null_space(covariances(base, train.x[train.y != 9]), get_recipe("adapter", "null-space").null_space_energy)
    project_(model, space)
    for n, layer in lora_layers(model):
        assert torch.allclose(layer.lora_A["default"], before[n], atol=1e-5), n
    bounds = output_bounds(model, base, train.x[train.y != 9][:2000], space)
    assert all(b["change"] <= b["bound"] + 1e-9 for b in bounds.values())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["elastic", "null-space"])
def test_a_batched_forgetting_job_equals_its_solo_run_bit_for_bit(recipe: str, data_root: Path) -> None:
    base = load_base(BASE)
    job = AdapterJob(9, recipe, (("eval_every", 5), ("seed", 0), ("steps", 10)), name="nine")
    other = AdapterJob(3, "replay", (("eval_every", 5), ("seed", 1), ("steps", 10)), name="three")
    (model, result), _ = train_batched(base, [job, other], data_dir=str(data_root))
    solo_model, solo = train_adapter(base, 9, recipe, data_dir=str(data_root), **dict(job.overrides))
    ours, theirs = model.lora_state_dict("default"), solo_model.lora_state_dict("default")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (result.steps, result.after.wrong_per_digit) == (solo.steps, solo.after.wrong_per_digit)
    assert (result.null_space is None) == (recipe != "null-space")

"""Task-vector merges (task arithmetic, TIES, DARE, magnitude prune): the paper definitions, peft's
``*_svd`` combinations on the same adapters, negation, seeded DARE, and stock peft loading the result."""

from __future__ import annotations

import copy

import pytest
import torch

from mnist_peft.errors import AdapterConfigError
from mnist_peft.io.adapters import AdapterFiles
from mnist_peft.merging.combine import combine_adapters
from mnist_peft.merging.methods import DELTA_METHODS, merge_deltas
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel, set_forward_mode


def _paper(deltas: list[torch.Tensor], w: list[float], method: str, density: float, sign: str, masks=None) -> torch.Tensor:
    """Entry-by-entry transcription of the definitions (peft's TIES reading), with explicit loops."""
    n = deltas[0].numel()
    flat = [d.reshape(-1).tolist() for d in deltas]
    if method in ("ties", "magnitude_prune"):
        k = int(density * n)
        kept = []
        for f in flat:
            top = set(sorted(range(n), key=lambda i: -abs(f[i]))[:k])  # no ties in random floats
            kept.append([v if i in top else 0.0 for i, v in enumerate(f)])
        flat = kept
    if method in ("dare_linear", "dare_ties"):
        flat = [[v * m / density for v, m in zip(f, mask.reshape(-1).tolist(), strict=True)] for f, mask in zip(flat, masks, strict=True)]
    out = []
    for i in range(n):
        vals = [f[i] for f in flat]
        if method in ("ties", "dare_ties"):
            votes = sum(vals) if sign == "total" else sum((v > 0) - (v < 0) for v in vals)
            elected = 1 if votes >= 0 else -1
            agree = [t for t, v in enumerate(vals) if (v > 0) - (v < 0) == elected]
            out.append(sum(w[t] * vals[t] for t in agree) / max(1, len(agree)))
        else:
            out.append(sum(wt * v for wt, v in zip(w, vals, strict=True)))
    return torch.tensor(out, dtype=torch.float64).reshape(deltas[0].shape)


@pytest.mark.parametrize("method", DELTA_METHODS)
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_each_method_matches_its_definition_entry_by_entry(method: str, sign: str) -> None:
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(6, 7, generator=g, dtype=torch.float64) for _ in range(3)]
    w, density = [0.7, -0.4, 1.3], 0.5
    masks = None
    if method.startswith("dare"):
        replay = torch.Generator().manual_seed(5)  # the same stream merge_deltas draws from, in order
        masks = [torch.bernoulli(torch.full_like(d, density), generator=replay) for d in deltas]
    got = merge_deltas(deltas, w, method=method, density=density, majority_sign=sign, generator=torch.Generator().manual_seed(5))
    # Not the same program (Python floats, explicit loops), so not held to the same bits: each entry
    # is a sum of <= 3 float64 products w_t * v_t (|v_t| <= 5 / density = 10 here, |w_t| <= 1.3),
    # then one division; <= 5 roundings of at most u = 1.1e-16 times partial sums <= 3 * 13 = 39,
    # so the two differ by <= 5 * 1.1e-16 * 39 = 2.2e-14 per entry (measured: 0). 1e-12 has room.
    torch.testing.assert_close(got, _paper(deltas, w, method, density, sign, masks), rtol=0, atol=1e-12)


def test_mergekit_ties_elects_on_weighted_deltas_and_divides_by_the_agreeing_weights() -> None:
    a, b = torch.tensor([[1.0, -2.0]]), torch.tensor([[-3.0, 1.0]])
    # weights 1 and 0.2: weighted, a's sign wins the first entry (1 vs -0.6); unweighted, b's does (-3 vs 1).
    peft_way = merge_deltas([a, b], [1.0, 0.2], method="ties", density=1.0)
    mergekit_way = merge_deltas([a, b], [1.0, 0.2], method="ties", density=1.0, ties_mode="mergekit")
    assert peft_way[0, 0].item() == pytest.approx(-0.6) and mergekit_way[0, 0].item() == pytest.approx(1.0)
    assert mergekit_way[0, 1].item() == pytest.approx(-2.0)  # -2 * 1 / 1: only a agrees with the elected sign


def _adapters(base: MnistMLP, n: int = 3, r: int = 4) -> list[AdapterFiles]:
    files = []
    for i in range(n):
        torch.manual_seed(10 + i)
        model = LoraModel(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False))
        files.append(AdapterFiles(config=model.peft_config["default"], state_dict=model.lora_state_dict(), metadata={}))
    return files


@pytest.mark.parametrize(
    ("method", "density"),
    [("svd", None), ("ties_svd", 0.4), ("magnitude_prune_svd", 0.3)],
)
def test_the_merged_adapter_equals_peft_add_weighted_adapter(method: str, density: float | None) -> None:
    """Same adapters, weights, density, sign rule and rank: the same merged factors, bit for bit, as
    peft's ``add_weighted_adapter`` (we run its ops in its order: the weighted sum of the deltas,
    the trim by ``topk``'s own mask, the sign election, ``torch.linalg.svd`` and the split of the
    singular values). DARE is compared below function to function: peft draws its masks after its
    own random init of the new adapter, from the global generator."""
    import peft

    from mnist_peft.io.peft_compat import native_to_peft_state_dict, to_peft_config

    torch.manual_seed(0)
    base = MnistMLP(48, 32, in_features=40).eval()
    files = _adapters(base)
    weights = [1.0, 0.5, -0.7]
    seed = 123
    ours = combine_adapters(files, weights, method="task_arithmetic" if method == "svd" else method, r=4, density=density, seed=seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), to_peft_config(files[0].config), adapter_name="a0")
    for i, f in enumerate(files):
        if i:
            theirs.add_adapter(f"a{i}", to_peft_config(f.config))
        peft.set_peft_model_state_dict(theirs, native_to_peft_state_dict(f.state_dict, f"a{i}"), adapter_name=f"a{i}")
    torch.manual_seed(seed)  # peft's DARE draws from the global generator, in the same order as ours
    kwargs = {"density": density} if density is not None else {}
    theirs.add_weighted_adapter(["a0", "a1", "a2"], weights, "merged", combination_type=method, svd_rank=4, **kwargs)
    for module in ("linear1", "linear2", "linear3"):
        layer = theirs.base_model.model.get_submodule(module)
        assert torch.equal(ours.state_dict[f"{module}.lora_A.weight"], layer.lora_A["merged"].weight), module
        assert torch.equal(ours.state_dict[f"{module}.lora_B.weight"], layer.lora_B["merged"].weight), module
        got = ours.state_dict[f"{module}.lora_B.weight"] @ ours.state_dict[f"{module}.lora_A.weight"]  # scaling 1
        assert layer.scaling["merged"] == 1.0 and torch.equal(got, layer.get_delta_weight("merged")), module


def test_negation_undoes_an_adapter_and_dare_is_reproducible() -> None:
    torch.manual_seed(0)
    base = MnistMLP(48, 32, in_features=40).eval()
    a = _adapters(base, n=1)[0]
    gone = combine_adapters([a, a], [1.0, -1.0], method="task_arithmetic", r=4)
    for module in ("linear1", "linear2", "linear3"):  # 1 * d + (-1) * d is exactly 0 in floating point
        assert not (gone.state_dict[f"{module}.lora_B.weight"] @ gone.state_dict[f"{module}.lora_A.weight"]).any()
    one = combine_adapters([a, a], [1.0, 0.5], method="dare_ties", r=4, density=0.5, seed=7)
    two = combine_adapters([a, a], [1.0, 0.5], method="dare_ties", r=4, density=0.5, seed=7)
    other = combine_adapters([a, a], [1.0, 0.5], method="dare_ties", r=4, density=0.5, seed=8)
    assert all(torch.equal(one.state_dict[k], two.state_dict[k]) for k in one.state_dict)
    assert not all(torch.equal(one.state_dict[k], other.state_dict[k]) for k in one.state_dict)
    with pytest.raises(AdapterConfigError, match="needs a density"):
        combine_adapters([a, a], method="ties", r=4)
    with pytest.raises(AdapterConfigError, match="density must be in"):
        combine_adapters([a, a], method="ties", r=4, density=1.5)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_on_the_same_random_stream(method: str) -> None:
    """Our DARE on each layer in turn from one seeded generator equals peft's ``merge_utils``
    functions on the same deltas with the global generator seeded alike, bit for bit: the same
    Bernoulli draws in the same order, then the same rescale, weighting and sum."""
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(3)
    layers = [[torch.randn(20, 30, generator=g) for _ in range(3)] for _ in range(2)]
    weights = [1.0, 0.5, -0.7]
    ours_g = torch.Generator().manual_seed(99)
    ours = [merge_deltas(d, weights, method=method, density=0.6, generator=ours_g) for d in layers]
    torch.manual_seed(99)
    theirs = [getattr(merge_utils, method)(d, torch.tensor(weights), 0.6) for d in layers]
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_a_ties_merge_from_the_cli_is_an_adapter_folder_stock_peft_loads_with_the_same_outputs(tmp_path) -> None:
    import peft
    from conftest import run_cli

    from mnist_peft.io.adapters import load_adapter, save_adapter

    torch.manual_seed(0)
    base = MnistMLP(48, 32, in_features=784).eval()
    folders = []
    for i in range(3):
        torch.manual_seed(20 + i)
        model = LoraModel(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
        folders.append(str(save_adapter(model, tmp_path / f"a{i}")))
    out = tmp_path / "merged"
    args = ["combine", *[x for f in folders for x in ("--adapter", f)], "--method", "ties_svd", "--density", "0.5", "--r", "4"]
    proc = run_cli(*args, "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    ours = LoraModel(copy.deepcopy(base))
    load_adapter(ours, out, "merged", activate=True)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    x = torch.randn(16, 784)
    set_forward_mode(ours, "exact")  # peft's ops in peft's order (the default fused path differs by rounding: test_claims.py)
    with torch.no_grad():
        assert torch.equal(ours.eval()(x), theirs(x))
        assert float((ours(x) - base(x)).abs().max()) > 1e-3  # the merge changes the model


def test_review_findings_a_narrow_layer_zero_density_mergekit_negatives_and_stray_density(tmp_path) -> None:
    """A layer narrower than r still gets rank-r factors (a loadable folder); density 0 is refused,
    not read as 1; mergekit's TIES refuses negative weights; --density with cat/svd is refused."""
    from mnist_peft.io.adapters import load_adapter, write_adapter

    torch.manual_seed(0)
    base = MnistMLP(48, 32, in_features=40).eval()
    a, b = _adapters(base, n=2, r=16)  # linear3 is (10, 32): narrower than r
    merged = combine_adapters([a, b], method="ties", density=0.5)
    assert merged.config.r == 16 and merged.state_dict["linear3.lora_B.weight"].shape == (10, 16)
    folder = write_adapter(merged.to_files(), tmp_path / "m")
    load_adapter(LoraModel(copy.deepcopy(base)), folder, "m")
    with pytest.raises(AdapterConfigError, match="density must be in"):
        combine_adapters([a, b], method="ties", density=0.0)
    with pytest.raises(AdapterConfigError, match="negative weight"):
        combine_adapters([a, b], [1.0, -1.0], method="ties", density=0.5, ties_mode="mergekit")
    with pytest.raises(AdapterConfigError, match="applies to ties"):
        combine_adapters([a, b], method="svd", r=4, density=0.5)
    with pytest.raises(AdapterConfigError, match="keeps no entry"):
        combine_adapters([a, b], method="ties", density=0.0001)


def test_ties_on_the_reference_digit_adapters_equals_peft() -> None:
    """The parity above, on the MNIST adapters the registry ships (full-size layers): the same factors, bit for bit."""
    import peft
    from conftest import REPO

    from mnist_peft.io.adapters import read_adapter
    from mnist_peft.io.peft_compat import native_to_peft_state_dict, to_peft_config
    from mnist_peft.model.mlp import load_base
    from mnist_peft.registry.adapter_registry import AdapterRegistry

    registry = AdapterRegistry(REPO / "adapters")
    base = load_base(registry.path("base"))
    files = [read_adapter(registry.path(n)) for n in ("digit-3", "digit-9")]
    ours = combine_adapters(files, [1.0, 0.8], method="ties_svd", r=4, density=0.3)
    theirs = peft.get_peft_model(copy.deepcopy(base), to_peft_config(files[0].config), adapter_name="a0")
    theirs.add_adapter("a1", to_peft_config(files[1].config))
    for i, f in enumerate(files):
        peft.set_peft_model_state_dict(theirs, native_to_peft_state_dict(f.state_dict, f"a{i}"), adapter_name=f"a{i}")
    theirs.add_weighted_adapter(["a0", "a1"], [1.0, 0.8], "merged", combination_type="ties_svd", density=0.3, svd_rank=4)
    for module in ("linear1", "linear2", "linear3"):
        layer = theirs.base_model.model.get_submodule(module)
        assert torch.equal(ours.state_dict[f"{module}.lora_A.weight"], layer.lora_A["merged"].weight), module
        assert torch.equal(ours.state_dict[f"{module}.lora_B.weight"], layer.lora_B["merged"].weight), module


def test_merge_study_chooses_on_validation_and_plots_test_accuracy_per_density(tmp_path, data_root) -> None:
    """A quick study on the reference adapters: each method's choice is the validation minimum over
    its grid; the plot's points are test accuracies at each density's validation-chosen scale."""
    from conftest import REPO
    from PIL import Image

    from mnist_peft.experiments.merge_study import StudyConfig, merge_study
    from mnist_peft.experiments.plots import plot_merge_study
    from mnist_peft.io.adapters import read_adapter
    from mnist_peft.model.mlp import load_base
    from mnist_peft.registry.adapter_registry import AdapterRegistry

    registry = AdapterRegistry(REPO / "adapters")
    base = load_base(registry.path("base"))
    files = [read_adapter(registry.path(f"digit-{d}")) for d in range(10)]
    cfg = StudyConfig(densities=(0.3, 1.0), scales=(0.5, 1.0), val_size=1000, search_steps=2)
    result = merge_study(base, files, data_dir=str(data_root), config=cfg, methods=("ties",))
    for method, chosen in result["chosen"].items():
        rows = [r for r in result["grid"] if r["method"] == method]
        assert len(rows) == len(cfg.densities) * len(cfg.scales)
        best = min(rows, key=lambda r: r["val_loss"])
        assert (chosen["density"], chosen["scale"]) == (best["density"], best["scale"])
        points = [r for r in result["curve"] if r["method"] == method]
        assert sorted(p["density"] for p in points) == sorted(cfg.densities)
        for p in points:
            at = min((r for r in rows if r["density"] == p["density"]), key=lambda r: r["val_loss"])
            assert p["scale"] == at["scale"] and 0.9 < p["test_accuracy"] <= 1.0
        chosen_point = next(p for p in points if p["density"] == chosen["density"])
        assert chosen_point["test_accuracy"] == chosen["test"]["accuracy"]
    # the validation split is the training set's own, not the test set: recomputed independently
    import torch.nn.functional as F

    from mnist_peft.model.data import load_mnist, split_validation

    _, val = split_validation(load_mnist(train=True, data_dir=str(data_root)), cfg.val_size, seed=cfg.seed)
    with torch.no_grad():
        assert result["base"]["val_loss"] == pytest.approx(float(F.cross_entropy(base(val.x), val.y)), rel=1e-6)
    chosen = result["chosen"]["ties"]
    assert set(chosen["on_edge"]) == {
        k
        for k, v, grid in (("density", chosen["density"], cfg.densities), ("scale", chosen["scale"], cfg.scales))
        if v in (min(grid), max(grid))
    }
    assert result["adapters"] == [f"digit-{d}" for d in range(10)]
    # the plot draws the curve's test accuracies (captured before saving), and needs nothing else
    import mnist_peft.experiments.plots as plots

    drawn = {}
    save = plots._save

    def capture(fig, path):
        for line in fig.axes[0].lines:
            drawn[line.get_label()] = list(line.get_ydata())
        return save(fig, path)

    plots._save = capture
    try:
        png = plot_merge_study({k: v for k, v in result.items() if k != "grid"}, tmp_path / "plot.png")
    finally:
        plots._save = save
    curve = sorted((p for p in result["curve"] if p["method"] == "ties"), key=lambda p: p["density"])
    assert drawn["ties"] == [p["test_accuracy"] for p in curve]
    assert Image.open(png).size[0] > 300


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_trim_keeps_the_entries_peft_magnitude_pruning_keeps(ties: bool, dtype: torch.dtype) -> None:
    """Our trim selects by linear-time partition; the kept entries must be exactly peft's topk mask,
    also when equal magnitudes straddle the threshold (then topk's own choice is used)."""
    from peft.utils.merge_utils import magnitude_based_pruning

    from mnist_peft.merging.task_vectors import trim as _trim

    g = torch.Generator().manual_seed(11)
    for shape in [(7, 9), (200, 150), (2000, 40)]:
        delta = torch.randn(shape, generator=g, dtype=dtype)
        if ties:
            delta = (delta * 2).round() / 2  # a few distinct magnitudes: ties at every threshold
        for density in (0.003, 0.1, 0.3, 0.77, 0.999):
            if int(density * delta.numel()) < 1:
                continue
            ours, theirs = _trim(delta, density), magnitude_based_pruning(delta, density)
            assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), (shape, density)
            assert int((ours != 0).sum()) <= int(density * delta.numel())


def test_task_vector_merges_accept_deltas_that_require_grad() -> None:
    g = torch.Generator().manual_seed(5)
    deltas = [torch.randn(30, 20, generator=g).requires_grad_() for _ in range(3)]
    for method in ("ties", "magnitude_prune"):
        merged = merge_deltas(deltas, [1.0, 0.5, 1.0], method=method, density=0.3)
        detached = merge_deltas([d.detach() for d in deltas], [1.0, 0.5, 1.0], method=method, density=0.3)
        assert torch.equal(merged.detach(), detached)


def test_a_methods_choice_is_scored_at_its_own_scale_even_after_a_nan_validation_loss(monkeypatch, data_root) -> None:
    """The choice's test score is looked up by (density, scale) among the curve's scored points. A
    NaN loss at a density's first scale sticks as that density's curve point, so the best point
    (a later scale) was never scored there and must be scored anew, at its own scale."""
    from mnist_peft.experiments import merge_study as ms

    losses = iter([0.5, 0.6, float("nan"), 0.2])  # density 0.3: scales 0.1, 0.5; density 1.0: NaN, then the best
    monkeypatch.setattr(ms, "_val_loss", lambda base, update, split: next(losses, 1.0))
    scored: list[float] = []

    class Scored:
        accuracy = 0.5

        def __init__(self, update):
            self.size = float(sum(d.abs().sum() for d in update.values()))  # the update's scale shows in its size

        def to_dict(self):
            return {"size": self.size}

    def evaluate_update(base, update, split):
        scored.append(Scored(update).size)
        return Scored(update)

    monkeypatch.setattr(ms, "_evaluate_update", evaluate_update)
    torch.manual_seed(0)
    base = MnistMLP().eval()
    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = LoraModel(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
        files.append(AdapterFiles(config=model.peft_config["default"], state_dict=model.lora_state_dict(), metadata={}))
    cfg = ms.StudyConfig(densities=(0.3, 1.0), scales=(0.1, 0.5), val_size=100, search_steps=0)
    result = ms.merge_study(base, files, data_dir=str(data_root), config=cfg, methods=("magnitude_prune",))
    chosen = result["chosen"]["magnitude_prune"]
    assert (chosen["density"], chosen["scale"]) == (1.0, 0.5)
    curve = {p["density"]: p for p in result["curve"]}
    assert curve[1.0]["scale"] == 0.1  # the NaN stuck
    # scored in order: density 0.3's curve point (val, test), density 1.0's at scale 0.1 (val, test), the choice
    assert scored[2] == scored[3] and chosen["test"]["size"] == pytest.approx(5 * scored[3], rel=1e-5)  # 0.5 / 0.1

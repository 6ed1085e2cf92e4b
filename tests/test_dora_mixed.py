"""Mixed batches with DoRA adapters: LoRA rows, DoRA rows and base rows in one forward
(:func:`mnist_peft.serving.forward.mixed_forward`) and through the serving engine.

On the registry's base (with its digit-3 and digit-9 LoRA adapters) and on a seeded base, float32
and float64, rows in any order, two seeded DoRA adapters beside them (one on all layers, one on
``linear2`` only; magnitudes moved off ``||W + s B A||`` as after training):

- each row equals that row run alone through its adapter (the exact path, a batch of one), and the
  float64 reference of the state test, within the fused path's bound ``sqrt(2000) eps max|y|``
  (``tests/test_claims.py``: ``fused_bound``). Not bit for bit: a GEMM's rounding depends on how many
  rows it sees and where a row sits (measured: no row of a 16-row batch equals its batch of one, for
  LoRA rows as for DoRA rows), in exact mode as in the default one. Measured here: 1.1 to 7.5
  eps max|y| (float32 and float64).
- bit for bit (``torch.equal``) where the same ops meet the same matrices: in exact mode a batch whose
  rows all use one DoRA adapter is peft's DoRA forward of that batch, and the LoRA and base rows of a
  mixed batch given in its internal order are peft's ``adapter_names=`` rows (peft cannot run the
  DoRA rows: it refuses ``adapter_names`` naming a DoRA adapter, asserted below).
- NaN in one DoRA adapter's weights, or in one row's input, reaches no other row.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import peft
import pytest
import torch
from conftest import REPO
from test_claims import fused_bound
from test_lora_state import _reference

from mnist_peft.errors import InvalidArgumentError
from mnist_peft.io.adapters import load_adapter, read_adapter, save_adapter
from mnist_peft.io.peft_compat import to_peft_config
from mnist_peft.model.data import MNIST_MEAN, MNIST_STD
from mnist_peft.model.mlp import MnistMLP, load_base
from mnist_peft.registry.adapter_registry import AdapterRegistry
from mnist_peft.serving.engine import Predictor
from mnist_peft.serving.forward import mixed_forward
from mnist_peft.serving.requests import image_to_input
from mnist_peft.tuners.dora.config import DoraConfig
from mnist_peft.tuners.lora.model import LoraModel, set_forward_mode
from mnist_peft.tuners.lora.targets import lora_layers

DTYPES = [torch.float32, torch.float64]
BASES = ["registry", "seeded"]
LORA = ("three", "nine")  # the registry's digit-3 and digit-9 (r=4, alpha 8)
DORA = {"dora-all": ["linear1", "linear2", "linear3"], "dora-mid": ["linear2"]}
ROWS = 24


def _dora_config(modules: list[str]) -> DoraConfig:
    return DoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False)


def _perturb_magnitudes(model: LoraModel, name: str) -> None:
    """m moved off ||W + s B A|| per row, as after training (at m/n = 1 a DoRA term is LoRA's)."""
    with torch.no_grad():
        for _, layer in lora_layers(model.model):
            if name in layer.lora_A:
                m = layer.lora_magnitude_vector[name]
                m.mul_(torch.rand(m.shape, dtype=m.dtype) + 0.5)


@pytest.fixture(scope="module")
def models(mnist_test):
    """Per (base, dtype): ours with the two LoRA and two DoRA adapters, frozen; stock peft holding the
    same weights; and test images. Tests leave them as they found them."""
    registry = AdapterRegistry(REPO / "adapters")
    torch.manual_seed(0)
    bases = {"registry": load_base(registry.path("base")).eval(), "seeded": MnistMLP().eval()}
    files = {n: read_adapter(registry.path(f"digit-{d}")) for n, d in zip(LORA, (3, 9), strict=True)}
    out = {}
    for base_name, base in bases.items():
        ours = LoraModel(copy.deepcopy(base))
        for n, f in files.items():
            ours.add_adapter(n, f.config, state_dict=f.state_dict)
        for i, (n, modules) in enumerate(DORA.items()):
            torch.manual_seed(10 + i)
            ours.add_adapter(n, _dora_config(modules))
            _perturb_magnitudes(ours, n)
        theirs = None
        for n, config in ours.peft_config.items():
            peft_config = to_peft_config(config)
            peft_config.use_dora = config.use_dora
            if theirs is None:
                theirs = peft.get_peft_model(copy.deepcopy(base), peft_config, adapter_name=n)
            else:
                theirs.add_adapter(n, peft_config)
        with torch.no_grad():
            for lname, layer in lora_layers(ours.model):
                other = theirs.base_model.model.get_submodule(lname)
                for n in layer.lora_A:
                    other.lora_A[n].weight.copy_(layer.lora_A[n])
                    other.lora_B[n].weight.copy_(layer.lora_B[n])
                    if n in DORA:
                        other.lora_magnitude_vector[n].weight.copy_(layer.lora_magnitude_vector[n])
        for dtype in DTYPES:
            a, b = copy.deepcopy(ours).to(dtype).eval(), copy.deepcopy(theirs).to(dtype).eval()
            for p in [*a.parameters(), *b.parameters()]:
                p.requires_grad_(False)
            out[base_name, dtype] = (a, b, mnist_test.x[:ROWS].to(dtype))
    return out


def _rows(n: int, seed: int) -> list[str | None]:
    """A random adapter (or None, or peft's "__base__") per row, in no order."""
    g = torch.Generator().manual_seed(seed)
    choices = [None, "__base__", *LORA, *DORA]
    return [choices[i] for i in torch.randint(0, len(choices), (n,), generator=g).tolist()]


def _alone(model: LoraModel, x: torch.Tensor, name: str | None) -> torch.Tensor:
    """``x`` (one row) through adapter ``name`` alone, on the exact path; the bare base for None."""
    active, weights = model.active_adapters, list(model.adapter_weights.values())
    set_forward_mode(model, "exact")
    try:
        with torch.no_grad():
            if name in (None, "__base__"):
                with model.disable_adapter():
                    return model(x)
            model.set_adapter(name)
            return model(x)
    finally:
        set_forward_mode(model, "auto")
        model.set_adapter(active, weights)


# ----------------------------------------------------------------------------- each row as if alone
@pytest.mark.parametrize("mode", ["auto", "exact"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("base", BASES)
def test_a_mixed_lora_and_dora_batch_equals_each_row_alone(models, base, dtype, mode) -> None:
    ours, _, x = models[base, dtype]
    rows = _rows(len(x), seed=1)
    assert {*LORA, *DORA} <= set(rows) and rows != sorted(rows, key=str)  # every kind of row, in no order
    set_forward_mode(ours, mode)
    try:
        y = mixed_forward(ours, x, rows)
    finally:
        set_forward_mode(ours, "auto")
    alone = torch.cat([_alone(ours, x[i : i + 1], n) for i, n in enumerate(rows)])
    bound = fused_bound(alone)
    assert float((y - alone).abs().max()) <= bound
    reference = _reference(ours, x, per_row=[None if n == "__base__" else n for n in rows])  # float64, from the definition
    assert float((y.double() - reference).abs().max()) <= bound
    bare = torch.cat([_alone(ours, x[i : i + 1], None) for i in range(len(x))])
    for i, n in enumerate(rows):  # each adapter changes its rows far beyond the bound, so a mix-up would show
        if n not in (None, "__base__"):
            assert float((alone[i] - bare[i]).abs().max()) > 1000 * bound, (i, n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_dora_adapter_on_one_layer_changes_only_what_flows_from_that_layer(models, dtype) -> None:
    """``dora-mid`` sits on ``linear2`` only: its rows equal a model holding just that layer's adapter."""
    ours, _, x = models["registry", dtype]
    y = mixed_forward(ours, x[:4], ["dora-mid"] * 4)
    only = LoraModel(_bare(ours))
    only.add_adapter("dora-mid", _dora_config(["linear2"]), state_dict=ours.lora_state_dict("dora-mid"))
    only = only.to(dtype).eval()
    assert list(ours.lora_state_dict("dora-mid")) == ["linear2.lora_A.weight", "linear2.lora_B.weight", "linear2.lora_magnitude_vector"]
    with torch.no_grad():
        expected = only(x[:4])
    assert torch.equal(y, expected)  # the same ops on the same rows (no other adapter touches a DoRA row)


def _bare(model: LoraModel) -> MnistMLP:
    """The bare base of ``model`` as a plain ``MnistMLP`` (a copy)."""
    plain = MnistMLP(**_sizes(model)).to(next(model.parameters()).dtype)
    plain.load_state_dict(model.base_state_dict())
    return plain


def _sizes(model: LoraModel) -> dict[str, int]:
    layers = dict(lora_layers(model.model))
    return {
        "in_features": layers["linear1"].in_features,
        "hidden_size_1": layers["linear1"].out_features,
        "hidden_size_2": layers["linear2"].out_features,
        "num_classes": layers["linear3"].out_features,
    }


# ----------------------------------------------------------------------------- bit for bit where the ops are the same
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(DORA))
def test_in_exact_mode_a_batch_through_one_dora_adapter_is_peft_bit_for_bit(models, dtype, name) -> None:
    ours, theirs, x = models["registry", dtype]
    set_forward_mode(ours, "exact")
    try:
        y = mixed_forward(ours, x, [name] * len(x))
    finally:
        set_forward_mode(ours, "auto")
    theirs.base_model.set_adapter(name)
    with torch.no_grad():
        assert torch.equal(y, theirs(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_exact_mode_the_lora_and_base_rows_beside_dora_rows_are_peft_adapter_names_bit_for_bit(models, dtype) -> None:
    """Rows given in the batch's own order (base rows, then each adapter's by name: no gather), so both
    sides run the base GEMM on the same matrix and each LoRA block on the same rows. peft gets the DoRA
    rows as base rows (it cannot run them), and those are not compared."""
    ours, theirs, x = models["registry", dtype]
    rows = [None] * 4 + [n for n in sorted([*LORA, *DORA]) for _ in range(5)]
    x = torch.cat([x, x])[: len(rows)]
    set_forward_mode(ours, "exact")
    try:
        y = mixed_forward(ours, x, rows)
    finally:
        set_forward_mode(ours, "auto")
    with torch.no_grad():
        stock = theirs(x, adapter_names=["__base__" if n is None or n in DORA else n for n in rows])
    kept = [i for i, n in enumerate(rows) if n not in DORA]
    assert torch.equal(y[kept], stock[kept])
    assert not torch.equal(y, stock)  # the DoRA rows did run their adapters


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stock_peft_refuses_adapter_names_with_a_dora_adapter(models, dtype) -> None:
    """What "peft cannot do this" rests on: peft's mixed batch refuses any row naming a DoRA adapter."""
    _, theirs, x = models["registry", dtype]
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"), torch.no_grad():
        theirs(x[:3], adapter_names=["three", "dora-all", "__base__"])


# ----------------------------------------------------------------------------- one tenant's NaN stays in its rows
@pytest.mark.parametrize("mode", ["auto", "exact"])
@pytest.mark.parametrize("where", ["magnitude", "lora_A"])
def test_nan_in_one_dora_adapters_weights_stays_in_its_rows(models, where, mode) -> None:
    ours, _, x = models["registry", torch.float32]
    model = copy.deepcopy(ours)
    rows = _rows(len(x), seed=2)
    set_forward_mode(model, mode)
    clean = mixed_forward(model, x, rows)
    with torch.no_grad():
        layer = model.model.linear2
        t = layer.lora_magnitude_vector["dora-all"] if where == "magnitude" else layer.lora_A["dora-all"]
        t.view(-1)[3] = float("nan")
    y = mixed_forward(model, x, rows)
    mine = torch.tensor([n == "dora-all" for n in rows])
    assert mine.any() and (~mine).any()
    assert not torch.isfinite(y[mine]).all()
    assert torch.equal(y[~mine], clean[~mine])  # the other rows: the same ops on the same values


@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_nan_in_one_dora_rows_input_stays_in_that_row(models, mode) -> None:
    ours, _, x = models["registry", torch.float32]
    rows = _rows(len(x), seed=3)
    i = rows.index("dora-all")
    set_forward_mode(ours, mode)
    try:
        clean = mixed_forward(ours, x, rows)
        bad = x.clone()
        bad[i, 100] = float("nan")
        y = mixed_forward(ours, bad, rows)
    finally:
        set_forward_mode(ours, "auto")
    others = [j for j in range(len(x)) if j != i]
    assert not torch.isfinite(y[i]).all()
    assert torch.isfinite(y[others]).all()
    assert float((y[others] - clean[others]).abs().max()) <= fused_bound(clean)  # measured: equal


# ----------------------------------------------------------------------------- the serving engine
@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, data_root: Path):
    """A copy of the registry with a DoRA adapter (``dora-x``, on the registry's base) added, and its engine."""
    root = tmp_path_factory.mktemp("dora-serving")
    shutil.copytree(REPO / "adapters", root / "adapters")
    registry = AdapterRegistry(root / "adapters")
    torch.manual_seed(7)
    model = LoraModel(load_base(registry.path("base")), _dora_config(list(DORA["dora-all"])))
    _perturb_magnitudes(model, "default")
    save_adapter(model, root / "dora-x")
    entry = registry.add("dora-x", root / "dora-x")
    assert entry.adapter_type == "dora"
    return registry, Predictor(registry, data_dir=str(data_root))


def _library(registry: AdapterRegistry, ref: str | None, x: torch.Tensor) -> torch.Tensor:
    """``x`` through the registry's base and adapter ``ref`` (None: the base), loaded apart from the engine."""
    model = LoraModel(load_base(registry.path("base"))).eval()
    if ref is None:
        with torch.no_grad():
            return model(x)
    load_adapter(model, registry.path(ref), "a", activate=True)
    set_forward_mode(model, "exact")
    with torch.no_grad():
        return model(x)


def test_the_engine_answers_dora_requests_beside_lora_and_base_ones_in_one_batch(engine, mnist_test) -> None:
    registry, predictor = engine
    pixels = (mnist_test.x[:6] * MNIST_STD + MNIST_MEAN).clamp(0, 1).reshape(6, 28, 28)
    specs = ["dora-x@1", "digit-9@1", None, "dora-x", "digit-3@1:0.5", "dora-x@1:1.0"]
    answers = predictor.answer([p.tolist() for p in pixels], specs)
    x = torch.cat([image_to_input(p.tolist()) for p in pixels])
    for k, (answer, spec) in enumerate(zip(answers, specs, strict=True)):
        assert "error" not in answer, answer
        base = _library(registry, None, x[k : k + 1])[0]
        ref, _, weight = (spec or "").partition(":")
        if weight and float(weight) != 1.0:  # a weighted LoRA stack: its own adapter at w s
            files = read_adapter(registry.path(ref))
            model = LoraModel(load_base(registry.path("base"))).eval()
            model.add_adapter("a", files.config, state_dict=files.state_dict)
            model.set_adapter("a", [float(weight)])
            with torch.no_grad():
                expected = model(x[k : k + 1])[0]
        else:
            expected = _library(registry, ref or None, x[k : k + 1])[0]
        got_base = torch.tensor(answer["base"]["logits"])
        assert float((got_base - base).abs().max()) <= fused_bound(base)
        if spec is None:
            assert answer["stack"] is None
            continue
        got = torch.tensor(answer["stack"]["logits"])
        assert float((got - expected).abs().max()) <= fused_bound(expected), spec
        assert float((got - base).abs().max()) > 1000 * fused_bound(expected)  # the adapter matters


@pytest.mark.parametrize(
    "spec", ["dora-x@1:0.5", "dora-x@1,digit-9@1", "digit-9@1:1,dora-x@1:1"], ids=["weighted", "first-of-two", "second-of-two"]
)
def test_the_engine_refuses_a_weighted_or_stacked_dora_adapter_for_that_request_only(engine, mnist_test, spec) -> None:
    """A DoRA term rescales each output row: it combines into one adapter with no other and scales by no
    weight, so the engine says so, for that request; the others of its batch are answered."""
    _, predictor = engine
    with pytest.raises(InvalidArgumentError, match="DoRA adapter, which is served alone at weight 1"):
        predictor.resolve(spec)
    pixels = (mnist_test.x[:2] * MNIST_STD + MNIST_MEAN).clamp(0, 1).reshape(2, 28, 28)
    answers = predictor.answer([p.tolist() for p in pixels], [spec, "dora-x@1"])
    assert "served alone at weight 1" in answers[0]["error"]
    assert "error" not in answers[1] and answers[1]["stack"]["adapters"] == [{"adapter": "dora-x@1", "weight": 1.0}]

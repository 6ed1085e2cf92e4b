"""A stateful property test of the native LoRA and DoRA: random call sequences against a naive reference.

Hypothesis drives one small model (same ``MnistMLP`` class, tiny sizes so thousands of steps run
in seconds) through random sequences of: add or load adapters (LoRA or DoRA, drawn half and half; r
in {1, 2, 4, 8}, random subsets of the target layers, random alpha, rsLoRA on or off), ``set_adapter`` with one or several names
and stack weights, merge of all or a subset (safe or not), unmerge, the disable switch, in-place
edits of any parameter (``.data.mul_``, ``.data.add_``, ``add_`` under ``no_grad``), dtype casts,
``merge_and_unload`` of a copy, save/load round trips and mixed batches with base rows.

After **every** step the model's output must equal a reference recomputed from scratch in float64
from the current tensors (:func:`_reference`: the live weight, then each active adapter the layer
holds and has not merged, in stack order: LoRA adds ``w s B A x``, DoRA
``y <- y + w ((m/n - 1)(y - b) + (m/n) s B A x)`` with ``n = ||W_base + s B A||`` per row, of the unmerged base), on both
the exact and the fused path, within the rounding bound of :func:`_bound`; merges are tracked in
float64 as the layer defines them (:func:`_merged_weight`: DoRA's factor ``m / ||W_base + s B A||``
from the unmerged base); the adapter state the model reports must equal the state the test tracks; and
stock peft, given the same weights and the same calls, gives the same output in every state: stack
weights as peft's per-layer ``scaling``, merges (all or a subset, in the same order) by peft's own
``merge_adapter``/``merge_and_unload(adapter_names=...)`` with the remaining active adapters run by
a peft model over that merged base, edits of a merged weight applied to peft's merged weight, edits
of a merged adapter after its merge (peft's merged weight keeps the old delta, as ours), the
disable switch by ``disable_adapter()`` (peft unmerges there), and mixed batches by
``adapter_names=``. DoRA adapters go to peft as ``LoraConfig(use_dora=True)`` with our magnitude
vectors. Where neither side carries rounding the other does not (no weight edited or cast while
merged, the switch not off while merged, no DoRA adapter merged into a layer after another adapter:
peft's ``_unmerged_base_weight`` then unmerges and re-merges by arithmetic) our exact path equals
peft's bit for bit (``torch.equal``).

States peft has no counterpart for, compared to the float64 reference only: switched off while
merged after a merged adapter was edited (peft's unmerge subtracts the edited adapter's delta, not
the merged one), or after the base weight of a layer with a merged DoRA adapter was edited or cast
(peft's DoRA unmerge divides the edit by the DoRA factor; ours keeps it as it was made); a DoRA adapter in
the stack or merged at a stack weight other than 1 (peft has no stack weights, and a DoRA term's
weight is no scaling); and the rows of a mixed batch that use a DoRA adapter (peft raises "Cannot
pass `adapter_names` when DoRA is enabled": those rows go to peft as ``"__base__"`` and only the
others are compared with it).

Settings: 180 derandomized examples (the same sequences every run) and 90 fresh ones from a seed
drawn at run time (printed; ``MNIST_PEFT_PROPERTY_SEED=<seed>`` replays them), each up to 30 steps.
For a longer hunt, ``MNIST_PEFT_PROPERTY_SCALE=10 pytest tests/test_lora_state.py`` runs 10x more.
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
from pathlib import Path

import peft
import pytest
import torch
from hypothesis import HealthCheck, event, seed, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from mnist_peft.errors import AdapterStateError, NonFiniteError
from mnist_peft.io.adapters import load_adapter, save_adapter
from mnist_peft.io.peft_compat import to_peft_config
from mnist_peft.model.mlp import MnistMLP
from mnist_peft.serving.forward import mixed_forward
from mnist_peft.tuners.dora.config import DoraConfig
from mnist_peft.tuners.dora.layer import DoraVariant
from mnist_peft.tuners.dora.magnitude import MAGNITUDE_KEY, MAX_MAGNITUDE
from mnist_peft.tuners.lora.config import LoraConfig
from mnist_peft.tuners.lora.model import LoraModel, set_forward_mode
from mnist_peft.tuners.lora.targets import lora_layers

LAYERS = ("linear1", "linear2", "linear3")
NAMES = ("x1", "x2", "y3", "z4")  # none is a substring of "lora_" (peft warns on that)
SIZES = {"in_features": 12, "hidden_size_1": 9, "hidden_size_2": 7, "num_classes": 5}
SCALE = float(os.environ.get("MNIST_PEFT_PROPERTY_SCALE", "1"))
FRESH_SEED = int(os.environ.get("MNIST_PEFT_PROPERTY_SEED") or random.SystemRandom().randrange(2**32))


def _is_dora(layer: torch.nn.Module, name: str) -> bool:
    return isinstance(layer.variants[name], DoraVariant)


def _factors64(layer: torch.nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """An adapter's A, B (float64), its magnitude vector (float64; None for LoRA) and its scaling."""
    A, B = layer.lora_A[name].double(), layer.lora_B[name].double()
    m = layer.lora_magnitude_vector[name].double() if _is_dora(layer, name) else None
    return A, B, m, layer.scaling[name]


def _dora_factor(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, s: float) -> torch.Tensor:
    """DoRA's row factor ``m / ||W + s B A||`` (out,), in float64."""
    return m / torch.linalg.vector_norm(W + s * (B @ A), dim=1)


def _term(layer: torch.nn.Module, name: str, h: torch.Tensor, out: torch.Tensor, w: float) -> torch.Tensor:
    """What adapter ``name`` adds to ``out`` (the layer's output so far for input ``h``) at stack weight
    ``w``: LoRA ``w s h A^T B^T``; DoRA ``w ((f - 1)(out - b) + f s h A^T B^T)``, f from the unmerged base
    weight (the live one unless adapters are merged into the layer; the weight a merge takes it from)."""
    A, B, m, s = _factors64(layer, name)
    lora = h @ A.T @ B.T
    if m is None:
        return w * s * lora
    f = _dora_factor(layer.unmerged_weight().double(), A, B, m, s)
    return w * ((f - 1) * (out - layer.base_layer.bias.double()) + f * s * lora)


@torch.no_grad()
def _merged_weight(layer: torch.nn.Module, names: list[str], live: torch.Tensor, base: torch.Tensor, weights: dict) -> torch.Tensor:
    """``live`` (float64) with ``names`` merged in turn, as the layer defines a merge: LoRA adds
    ``w s B A``; DoRA makes ``(1 + w (f - 1)) W + w f s B A`` with ``f = m / ||base + s B A||`` from the
    unmerged ``base`` (peft's ``_unmerged_base_weight``)."""
    W = live.clone()
    for n in names:
        A, B, m, s = _factors64(layer, n)
        w = weights.get(n, 1.0)
        if m is None:
            W = W + w * s * (B @ A)
        else:
            f = _dora_factor(base, A, B, m, s).view(-1, 1)
            W = (1 + w * (f - 1)) * W + w * f * s * (B @ A)
    return W


@torch.no_grad()
def _reference(
    model: LoraModel, x: torch.Tensor, *, per_row: list[str | None] | None = None, disabled: bool = False, base: dict | None = None
) -> torch.Tensor:
    """The output recomputed in float64 from the model's current tensors, naively.

    ``per_row``: a mixed batch (row i through adapter ``per_row[i]`` alone at its scaling).
    ``base``: the unmerged base weights to use (for the disabled switch and mixed rows).
    """
    state, h = model.state, x.detach().double()
    for name in LAYERS:
        layer = model.model.get_submodule(name)
        if not hasattr(layer, "lora_A"):  # a plain nn.Linear (merge_and_unload)
            h = h @ layer.weight.double().T + layer.bias.double()
        else:
            W = layer.base_layer.weight.double() if base is None else base[name]
            out = h @ W.T + layer.base_layer.bias.double()
            if per_row is not None:
                for i, n in enumerate(per_row):
                    if n is not None and n in layer.lora_A:
                        out[i] += _term(layer, n, h[i : i + 1], out[i : i + 1], 1.0)[0]
            elif not disabled:
                for n in state.active:
                    if n in layer.lora_A and n not in layer.merged_adapters:
                        out = out + _term(layer, n, h, out, state.weight(n))
            h = out
        h = torch.relu(h) if name != "linear3" else h
    return h


def _reductions(layer: torch.nn.Module) -> int:
    """The most rounded terms one output element of ``layer`` sums, on any path: ``in`` products and
    the bias, per adapter r products for ``x A^T`` and r for ``(x A^T) B^T``, its scaling and its add,
    and in a merged weight one rounding per merged delta (<= 4 adapters) and its sum: <= in + 2R + 8.

    Each DoRA adapter the layer holds adds one row norm ``||W + s B A||`` (r products per entry of
    ``B A``, the scaling and the add, ``in`` squares summed and the root: <= in + R + 4 roundings, whose
    error reaches the output through the factor m/n, as :func:`_bound` accounts) and ~8 roundings of
    its term (``y - b``, ``f - 1``, two products, ``* s``, the sum, ``* w``, the add) or of its merge:
    <= in + 2R + 13 more. With d DoRA adapters the count is <= (1 + d)(in + 2R + 13)."""
    if not hasattr(layer, "lora_A"):
        return layer.in_features + 8
    n = layer.in_features + 2 * sum(layer.r.values()) + 8
    dora = sum(_is_dora(layer, a) for a in layer.lora_A)
    return n if not dora else (1 + dora) * (n + 5)


@torch.no_grad()
def _dora_ranges(layer: torch.nn.Module, name: str, weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row (out,), the most over the weights the norm may be taken of (live, unmerged base): |f|,
    |f - 1|, and ``F = max(1, |f|) kappa``, for DoRA's factor f = m / ||W + s B A||.

    The computed factor carries the norm's rounding: |n_hat - n| <= gamma_k || |W| + |s||B||A| || per
    row (each entry of ``W + s B A`` is within gamma of its absolute sum and the norm is 1-Lipschitz;
    its sum of squares and root add gamma_in relative), so |f_hat - f| <= gamma_k |f| kappa with
    ``kappa = || |W| + |s||B||A| || / ||W + s B A||`` >= 1, the row's condition number."""
    A, B, m, s = _factors64(layer, name)
    absolute = abs(s) * (B.abs() @ A.abs())
    zero = torch.zeros(layer.out_features, dtype=torch.float64)
    f_abs, g, F = zero, zero, zero + 1
    for W in weights:
        n = torch.linalg.vector_norm(W + s * (B @ A), dim=1)
        f = m / n
        kappa = torch.linalg.vector_norm(W.abs() + absolute, dim=1) / n
        f_abs, g, F = torch.maximum(f_abs, f.abs()), torch.maximum(g, (f - 1).abs()), torch.maximum(F, f.abs().clamp(min=1) * kappa)
    return f_abs, g, F


@torch.no_grad()
def _cover(
    layer: torch.nn.Module, names: list[str], P: torch.Tensor, R: torch.Tensor, Rb: torch.Tensor, weight, norm_of: list[torch.Tensor]
):
    """``names`` applied in turn, at |stack weight| ``weight(n)``, to two absolute weights: ``P``, what
    the layer's effective weight is within (how errors of its input reach its output), and ``R`` (with
    ``Rb`` for the bias), what each rounding of the layer is relative to.

    LoRA adds ``|w s| |B||A|`` to both. DoRA's term ``w ((f - 1)(y - b) + f s B A x)`` maps the output
    so far y - b by ``1 + w (f - 1)``: P -> (1 + |w||f - 1|) P + |w f s| |B||A|. Its roundings are of
    the partial results, and f carries its own error (:func:`_dora_ranges`), so R grows by F as well:
    R -> (1 + |w|(|f - 1| + F)) R + |w| F |s||B||A|, and the bias, subtracted and added back, likewise."""
    for a in names:
        sw = weight(a)
        A, B, m, s = _factors64(layer, a)
        absolute = abs(s) * (B.abs() @ A.abs())
        if m is None:
            P, R = P + sw * absolute, R + sw * absolute
            continue
        f_abs, g, F = _dora_ranges(layer, a, norm_of)
        P = (1 + sw * g).view(-1, 1) * P + (sw * f_abs).view(-1, 1) * absolute
        R = (1 + sw * (g + F)).view(-1, 1) * R + (sw * F).view(-1, 1) * absolute
        Rb = (1 + 2 * sw * (g + F)) * Rb
    return P, R, Rb


@torch.no_grad()
def _bound(
    model: LoraModel, x: torch.Tensor, u: float, covers: dict[str, tuple[torch.Tensor, torch.Tensor]], base: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Per output element, the most two computations of this model's output may differ by rounding.

    Each layer's output element is a sum of at most n = :func:`_reductions` rounded terms; each
    rounding is within u (unit roundoff) of a partial sum, itself bounded by the same sum over
    absolute values, so one layer adds an error <= gamma_n (|h| R^T + |b|), gamma_n = n u / (1 - n u)
    (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1 and eq. 3.4), with
    R the absolute weight: the live weight plus what covers the merged deltas (``covers``: live,
    unmerged and merged weights), and every adapter the layer holds at |scaling| max(1, |stack
    weight|). ReLU is 1-Lipschitz and an earlier layer's error E reaches the next through the
    absolute effective weight P (for LoRA P = R), so E_l = E_{l-1} P^T + gamma_n (|h| R^T + |b|), |h|
    the forward pass over absolute values. For LoRA alone that is <= 3 gamma_n M, M the absolute
    forward pass. Two computations (ours and the float64 reference, ours and peft) differ by at most
    2E. In float64, n <= 84 for LoRA here: <= 5.6e-14 M; ``u`` is float32's where a merge made in
    float32 is still in the weights of a model now in float64.

    DoRA divides by a norm. A DoRA adapter rescales the output so far by 1 + w (f - 1), which P
    carries; its factor f = m/n is computed with an error <= gamma_k |f| kappa (kappa the row's
    condition number, :func:`_dora_ranges`), which R carries as F = max(1, |f|) kappa (:func:`_cover`),
    so it is one more gamma times R, counted by :func:`_reductions`. F enters only the layer's own
    rounding term, not the propagation, so it does not compound over layers. The active adapters go
    first, in stack order, then the others (a mixed batch's rows run one alone); merged ones are in
    ``covers`` instead (while merged they do not run).
    """
    h = x.detach().double().abs()
    E = torch.zeros_like(h)
    for name in LAYERS:
        layer = model.model.get_submodule(name)
        n = _reductions(layer)
        gamma = n * u / (1 - n * u)
        if not hasattr(layer, "lora_A"):
            P = layer.weight.double().abs()
            E, h = E @ P.T + gamma * (h @ P.T + layer.bias.double().abs()), h @ P.T + layer.bias.double().abs()
            continue
        live, bias = layer.base_layer.weight.double(), layer.base_layer.bias.double().abs()
        P, R = (live.abs() + c if c.numel() else live.abs() for c in covers[name])
        held = [a for a in layer.lora_A if a not in layer.merged_adapters]  # a merged one never runs: its cover has it
        order = [a for a in model.state.active if a in held] + [a for a in held if a not in model.state.active]
        P, R, Rb = _cover(layer, order, P, R, bias, lambda a: max(1.0, abs(model.state.weight(a))), [live, base[name]])
        E, h = E @ P.T + gamma * (h @ R.T + Rb), h @ P.T + bias
    return 2 * E


def _close(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|actual - expected| <= bound, element by element."""
    err = (actual.detach().double() - expected.detach().double()).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), f"{what}: |diff| {float(err.flatten()[worst]):.3g} > bound {float(bound.flatten()[worst]):.3g}"


class LoraStateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = LoraModel(MnistMLP(**SIZES)).eval()
        self.x = torch.randn(6, SIZES["in_features"])
        self.dtype = torch.float32
        self.active: list[str] = []  # what the test expects the model to report
        self.weights: dict[str, float] = {}
        self.merged: list[str] = []
        self.disabled = False
        self.w_at_merge: dict[str, torch.Tensor] = {}  # live weight when the first merge happened
        self.base_edited: set[str] = set()  # layers whose weight was edited or cast while merged
        self.deltas: dict[str, torch.Tensor] = {n: torch.zeros(0) for n in LAYERS}  # merged deltas, float64
        self.covers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {n: (torch.zeros(0), torch.zeros(0)) for n in LAYERS}  # see track_merge
        self.at_merge: dict[str, dict[str, dict[str, torch.Tensor]]] = {}  # adapter -> layer -> its tensors when merged
        self.fp32_merge = False  # a merge made in float32 is in the weights
        self.merged_adapter_edited = False
        self.dora_merged: set[str] = set()  # layers holding a merged DoRA adapter
        self.dora_replayed = False  # a DoRA adapter was merged into a layer after another one (peft re-merges by arithmetic)
        self.dora_base_edited = False  # a base weight was edited (or cast) after a DoRA adapter was merged into it
        self.peft_cache: dict[tuple, torch.nn.Module] = {}  # see unmerged_peft_model
        self.tmp = tempfile.TemporaryDirectory()

    def teardown(self) -> None:
        self.tmp.cleanup()

    # -- helpers
    def loaded(self) -> list[str]:
        return sorted(self.model.peft_config)

    def unmerged_base(self) -> dict[str, torch.Tensor]:
        """Live weights minus the deltas merged into them (float64): what the base is now."""
        out = {}
        for name in LAYERS:
            layer = self.model.model.get_submodule(name)
            w = layer.base_layer.weight.double() if hasattr(layer, "base_layer") else layer.weight.double()
            out[name] = w - self.deltas[name] if self.deltas[name].numel() else w
        return out

    def u(self) -> float:
        """The unit roundoff the weights carry: float32's after a float32 merge, even once cast to float64."""
        dtype = torch.float32 if self.fp32_merge else self.dtype
        return torch.finfo(dtype).eps / 2

    def bound(self) -> torch.Tensor:
        return _bound(self.model, self.x, self.u(), self.covers, self.unmerged_base())

    def clean(self) -> bool:
        """No rounding on one side that the other lacks: nothing edited or cast while merged, the
        switch not off while merged (peft unmerges there by subtraction; we restore the tensor), and no
        DoRA adapter merged after another adapter into one layer (peft's ``_unmerged_base_weight``
        unmerges the earlier ones by arithmetic for the norm and merges them again; we keep the base)."""
        return not self.base_edited and not self.merged_adapter_edited and not (self.disabled and self.merged) and not self.dora_replayed

    def dora_weighted(self) -> bool:
        """Whether a DoRA adapter runs or is merged at a stack weight other than 1 (peft has no stack weights)."""
        names = set(self.merged) | {n for n in self.active if n not in self.merged}
        return any(
            self.model.state.weight(n) != 1.0 and any(_is_dora(layer, n) for _, layer in lora_layers(self.model.model) if n in layer.lora_A)
            for n in names
        )

    def expect_refusal(self, fn, match: str) -> None:
        before = self.snapshot()
        with pytest.raises(AdapterStateError, match=match):
            fn()
        after = self.snapshot()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), "a refused call changed the model"

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # -- rules
    @rule(
        name=st.sampled_from(NAMES),
        r=st.sampled_from([1, 2, 4, 8]),
        modules=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True),
        alpha=st.sampled_from([0.5, 1.0, 3.0, 8.0]),
        rslora=st.booleans(),
        seed=st.integers(0, 2**16),
        dora=st.booleans(),
    )
    def add_adapter(self, name, r, modules, alpha, rslora, seed, dora) -> None:
        kind = DoraConfig if dora else LoraConfig  # DoRA: m starts as ||W + s B A|| per row, B random: a real update
        config = kind(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=modules, init_lora_weights=False)
        if name in self.model.peft_config:
            return self.expect_refusal(lambda: self.model.add_adapter(name, config), "already exists")
        if self.merged:
            return self.expect_refusal(lambda: self.model.add_adapter(name, config), "unmerge")
        torch.manual_seed(seed)
        self.model.add_adapter(name, config)
        if dora:  # as after training: m apart from ||W + s B A|| (at m/n = 1 a DoRA term is LoRA's)
            with torch.no_grad():
                for _, layer in lora_layers(self.model.model):
                    if name in layer.lora_A:
                        m = layer.lora_magnitude_vector[name]
                        m.mul_(torch.rand(m.shape, dtype=m.dtype) + 0.5)
        if not self.active:
            self.active, self.weights = [name], {name: 1.0}

    @precondition(lambda self: bool(self.model.peft_config))
    @rule(data=st.data(), new_name=st.sampled_from(NAMES))
    def save_and_load(self, data, new_name) -> None:
        """Round trip through the files: the loaded copy has the same bits as the saved adapter."""
        name = data.draw(st.sampled_from(self.loaded()))
        folder = Path(self.tmp.name) / f"{name}-{len(os.listdir(self.tmp.name))}"
        state = self.model.lora_state_dict(name)
        if any(k.endswith(MAGNITUDE_KEY) and float(t.abs().max()) > MAX_MAGNITUDE for k, t in state.items()):
            with pytest.raises(NonFiniteError, match="magnitudes beyond"):  # edits grew m past the files' bound
                save_adapter(self.model, folder, name)
            return None
        save_adapter(self.model, folder, name)
        if new_name in self.model.peft_config or self.merged:
            return self.expect_refusal(lambda: load_adapter(self.model, folder, new_name), "already exists|unmerge")
        load_adapter(self.model, folder, new_name)
        saved, loaded = self.model.lora_state_dict(name), self.model.lora_state_dict(new_name)
        assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
        assert self.model.peft_config[new_name] == self.model.peft_config[name]
        if not self.active:
            self.active, self.weights = [new_name], {new_name: 1.0}

    @precondition(lambda self: bool(self.model.peft_config))
    @rule(data=st.data())
    def delete_adapter(self, data) -> None:
        name = data.draw(st.sampled_from(self.loaded()))
        if name in self.merged:
            return self.expect_refusal(lambda: self.model.delete_adapter(name), "unmerge")
        self.model.delete_adapter(name)
        if name in self.active:
            self.active.remove(name)
            self.weights.pop(name)

    @precondition(lambda self: bool(self.model.peft_config))
    @rule(data=st.data(), weighted=st.booleans())
    def set_adapter(self, data, weighted) -> None:
        names = data.draw(st.lists(st.sampled_from(self.loaded()), min_size=1, max_size=4, unique=True))
        weights = (
            data.draw(st.lists(st.sampled_from([-1.5, -0.5, 0.25, 1.0, 2.0]), min_size=len(names), max_size=len(names)))
            if weighted
            else None
        )
        if self.merged:
            return self.expect_refusal(lambda: self.model.set_adapter(names, weights), "unmerge")
        self.model.set_adapter(names, weights)
        self.active, self.weights = list(names), dict(zip(names, weights or [1.0] * len(names), strict=True))

    @precondition(lambda self: bool(self.model.peft_config))
    @rule(data=st.data(), use_active=st.booleans(), safe=st.booleans(), one_by_one=st.booleans())
    def merge(self, data, use_active, safe, one_by_one) -> None:
        """Merge the active adapters or a drawn list, in one call or one call per adapter (then a DoRA
        adapter's norm, of the unmerged base, differs from the live weight's that its forward used)."""
        names = None if use_active else data.draw(st.lists(st.sampled_from(self.loaded()), min_size=1, max_size=3, unique=True))
        todo = [n for n in (self.active if names is None else names) if n not in self.merged]
        for call in [[n] for n in todo] if one_by_one and todo else [todo]:
            wanted = self.merged + call
            if self.dora_in_play(call) and wanted != self.active[: len(wanted)]:  # a merge out of stack order
                self.expect_refusal(lambda c=call: self.model.merge(c if one_by_one else names, safe_merge=safe), "in order")
                return
            self.track_merge(call)
            self.model.merge(call if one_by_one else names, safe_merge=safe)
            self.merged += call
        self.fp32_merge |= bool(todo) and self.dtype == torch.float32

    def dora_in_play(self, names: list[str]) -> bool:
        """Whether a DoRA adapter is among ``names`` or the active stack: then a merge must take the active
        stack in order (its term rescales the output so far), else it is refused."""
        in_play = set(names) | set(self.active)
        return any(_is_dora(layer, n) for _, layer in lora_layers(self.model.model) for n in in_play if n in layer.lora_A)

    def track_merge(self, todo: list[str]) -> None:
        """Before merging ``todo``: what each layer's merged weight must be (float64, :func:`_merged_weight`),
        what covers it for the bound, and the tensors peft must merge."""
        base = self.unmerged_base()
        weight = self.model.state.weight
        for lname, layer in lora_layers(self.model.model):
            mine = [n for n in todo if n in layer.lora_A]
            if not mine:
                continue
            dora = [i for i, n in enumerate(mine) if _is_dora(layer, n)]
            self.dora_replayed |= any(i > 0 or layer.merged_adapters for i in dora)
            if dora:
                self.dora_merged.add(lname)
            if not layer.merged_adapters:
                self.w_at_merge[lname] = layer.base_layer.weight.detach().clone()
            live = layer.base_layer.weight.double()
            delta = _merged_weight(layer, mine, live, base[lname], {n: weight(n) for n in mine}) - live
            self.deltas[lname] = delta if not self.deltas[lname].numel() else self.deltas[lname] + delta
            # What covers the weights for the bound, added to |live|: P covers the base (|base| <= the old
            # live's P), R also the merged weight's rounding (each DoRA factor's error as in _cover).
            P, R = (c if c.numel() else torch.zeros_like(live) for c in self.covers[lname])
            if dora:
                zero_bias = torch.zeros(layer.out_features, dtype=torch.float64)
                _, R, _ = _cover(layer, mine, live.abs() + P, live.abs() + R, zero_bias, lambda n: abs(weight(n)), [base[lname]])
                P = live.abs() + P
            else:  # |w s| |B| |A| summed
                added = sum(
                    abs(weight(n) * layer.scaling[n]) * (layer.lora_B[n].double().abs() @ layer.lora_A[n].double().abs()) for n in mine
                )
                P, R = P + added, R + added
            self.covers[lname] = (P, R)
            for n in mine:  # what peft must merge: the weights as they are now, whatever edits come later
                self.at_merge.setdefault(n, {})[lname] = {k: t.detach().clone() for k, t in layer.adapter_tensors(n).items()}

    @rule()
    def unmerge(self) -> None:
        before = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(self.model.model) if layer.merged_adapters}
        expected = self.unmerged_base()
        self.model.unmerge()
        for lname, live in before.items():
            w = self.model.model.get_submodule(lname).base_layer.weight
            if lname not in self.base_edited:
                assert torch.equal(w, self.w_at_merge[lname]), f"{lname}: unmerge must restore the base bit-exactly"
            else:  # edited while merged: the edit is kept (peft's live - delta). Each side rounds the
                # deltas (r + 1 roundings each, summed) and the subtraction: <= n u (|live| + sum |delta|)
                # with n = _reductions, and the two sides differ by at most twice that.
                n = _reductions(self.model.model.get_submodule(lname))
                bound = 2 * n * self.u() * (live.double().abs() + self.covers[lname][1])
                _close(w.detach(), expected[lname], bound, f"{lname} weight after unmerge of an edited merge")
        self.merged, self.w_at_merge, self.base_edited = [], {}, set()
        self.merged_adapter_edited, self.fp32_merge, self.at_merge = False, False, {}
        self.dora_merged, self.dora_replayed, self.dora_base_edited = set(), False, False
        self.deltas = {n: torch.zeros(0) for n in LAYERS}
        self.covers = {n: (torch.zeros(0), torch.zeros(0)) for n in LAYERS}

    @rule(on=st.booleans())
    def switch(self, on) -> None:
        (self.model.enable_adapter_layers if on else self.model.disable_adapter_layers)()
        self.disabled = not on

    @rule(
        data=st.data(),
        op=st.sampled_from(["data_mul", "data_add", "no_grad_add", "detach_mul", "data_read"]),
        value=st.sampled_from([-1.0, 0.5, 2.0]),
    )
    def edit_parameter(self, data, op, value) -> None:
        params = dict(self.model.named_parameters())
        key = data.draw(st.sampled_from(sorted(params)))
        p = params[key]
        if op == "data_mul":
            p.data.mul_(value)
        elif op == "data_add":
            p.data.add_(value / 10)
        elif op == "no_grad_add":
            with torch.no_grad():
                p.add_(value / 10)
        elif op == "detach_mul":
            p.detach().mul_(value)
        else:  # reads .data without writing: nothing changes, unmerge must stay bit-exact
            p.data.clone()
            return
        lname = key.split(".")[1]
        if key.endswith("base_layer.weight") and lname in self.w_at_merge:
            self.base_edited.add(lname)  # unmerge must keep the edit: the base becomes live - delta, as in peft
            self.dora_base_edited |= lname in self.dora_merged  # peft's DoRA unmerge would divide the edit by m/n
        if ".lora_" in key and key.split(".")[-1] in self.merged:  # model.<layer>.lora_A.<adapter>
            self.merged_adapter_edited = True  # the merged weight keeps the old delta (peft's too: it is given the old weights)

    @rule(dtype=st.sampled_from([torch.float32, torch.float64]))
    def cast(self, dtype) -> None:
        if dtype == self.dtype:
            return
        self.model.to(dtype)
        self.x = self.x.to(dtype)
        self.dtype = dtype
        self.base_edited |= set(self.w_at_merge)
        self.dora_base_edited |= bool(self.dora_merged)  # the cast's rounding is an edit of a merged weight
        self.w_at_merge = {k: v.to(dtype) for k, v in self.w_at_merge.items()}

    @rule()
    def merge_and_unload_a_copy(self) -> None:
        """The plain model carries the merged and the active adapters (also when switched off, as in peft).

        The expected output is the forward through the merged weights (tracked in float64), which is the
        function the model computed (a DoRA adapter's norm is of the unmerged base in both)."""
        copied = copy.deepcopy(self.model)
        base, h = self.unmerged_base(), self.x.double()
        for lname in LAYERS:
            layer = self.model.model.get_submodule(lname)
            if not hasattr(layer, "lora_A"):  # no adapter here yet: a plain nn.Linear
                h = h @ layer.weight.double().T + layer.bias.double()
            else:
                todo = [n for n in self.model.state.active if n in layer.lora_A and n not in layer.merged_adapters]
                W = _merged_weight(layer, todo, layer.base_layer.weight.double(), base[lname], self.model.adapter_weights)
                h = h @ W.T + layer.base_layer.bias.double()
            h = torch.relu(h) if lname != "linear3" else h
        expected = h
        plain = copied.merge_and_unload()
        assert type(plain.linear1) is torch.nn.Linear
        with torch.no_grad():
            _close(plain(self.x), expected, self.bound(), "merge_and_unload of a copy")

    @precondition(lambda self: bool(self.model.peft_config))
    @rule(data=st.data())
    def mixed_batch(self, data) -> None:
        choices = [*self.loaded(), None, "__base__"]
        rows = data.draw(st.lists(st.sampled_from(choices), min_size=self.x.shape[0], max_size=self.x.shape[0]))
        if self.merged:
            return self.expect_refusal(lambda: mixed_forward(self.model, self.x, rows), "unmerge")
        y = mixed_forward(self.model, self.x, rows)
        assert y.dtype == self.dtype
        per_row = None if self.disabled else [None if r == "__base__" else r for r in rows]
        expected = _reference(self.model, self.x, per_row=per_row or [None] * len(rows))
        _close(y, expected, self.bound(), f"mixed batch {rows}")
        # peft refuses adapter_names naming a DoRA adapter: its rows go to peft as base rows, and are not compared
        dora = {n for n in self.loaded() if any(_is_dora(layer, n) for _, layer in lora_layers(self.model.model) if n in layer.lora_A)}
        theirs = self.unmerged_peft_model(self.loaded(), stack_weights=False)  # peft's mixed batch ignores them too
        names = ["__base__" if r is None or r in dora else r for r in rows]
        with torch.no_grad():
            if self.disabled:
                with theirs.disable_adapter():
                    stock = theirs(self.x, adapter_names=names)
            else:
                stock = theirs(self.x, adapter_names=names)
        kept = [i for i, r in enumerate(rows) if r not in dora]
        event(f"mixed batch: {len(kept)} of {len(rows)} rows compared with peft")
        if kept:
            _close(y[kept], stock[kept], self.bound()[kept], f"mixed batch {rows} vs stock peft")

    # -- after every step
    @invariant()
    def reported_state_is_the_tracked_state(self) -> None:
        assert self.model.active_adapters == self.active
        assert self.model.adapter_weights == self.weights
        assert sorted(self.model.merged_adapters) == sorted(self.merged)  # the union over layers
        for _, layer in lora_layers(self.model.model):
            assert layer.merged_adapters == [n for n in self.merged if n in layer.lora_A]

    @invariant()
    def output_equals_the_reference_on_both_paths(self) -> None:
        expected = _reference(self.model, self.x, disabled=self.disabled, base=self.unmerged_base() if self.disabled else None)
        with torch.no_grad():
            fused = self.model(self.x)
            set_forward_mode(self.model, "exact")
            exact = self.model(self.x)
            set_forward_mode(self.model, "auto")
        _close(fused, expected, self.bound(), "fused path")
        _close(exact, expected, self.bound(), "exact path")

    # -- stock peft, given the same weights and the same calls
    def peft_base(self) -> MnistMLP:
        """The bare base (unmerged weights) in the model's dtype."""
        base = MnistMLP(**SIZES).to(self.dtype)
        base.load_state_dict({k: v.to(self.dtype) for k, v in self.model.base_state_dict().items()})
        return base

    def peft_model(self, base: torch.nn.Module, names: list[str], *, stack_weights: bool = True, at_merge: bool = False):
        """A peft model over ``base`` holding ``names`` with our configs and current weights (with
        ``at_merge``, merged adapters get the weights they were merged with); a stack weight w
        becomes peft's per-layer scaling s * w, the float our layer computes with (LoRA; a DoRA adapter
        is compared only at weight 1). A DoRA adapter is peft's ``use_dora=True`` with our magnitudes."""
        theirs = peft.get_peft_model(base, _peft_config(self.model.peft_config[names[0]]), adapter_name=names[0])
        for n in names[1:]:
            theirs.add_adapter(n, _peft_config(self.model.peft_config[n]))
        self.give_adapters(theirs, names, stack_weights=stack_weights, at_merge=at_merge)
        return theirs.eval()

    def give_adapters(self, theirs, names: list[str], *, stack_weights: bool, at_merge: bool) -> None:
        """Copy our adapters' weights and scalings into peft model ``theirs`` (see :meth:`peft_model`)."""
        with torch.no_grad():
            for lname, layer in lora_layers(self.model.model):
                other = theirs.base_model.model.get_submodule(lname)
                for n in names:
                    if n not in layer.lora_A:
                        continue
                    tensors = self.at_merge[n][lname] if at_merge and n in self.at_merge else layer.adapter_tensors(n)
                    other.lora_A[n].weight.copy_(tensors["lora_A.weight"])
                    other.lora_B[n].weight.copy_(tensors["lora_B.weight"])
                    if MAGNITUDE_KEY in tensors:
                        other.lora_magnitude_vector[n].weight.copy_(tensors[MAGNITUDE_KEY])
                    other.scaling[n] = layer.effective_scaling(n) if stack_weights else layer.scaling[n]

    def unmerged_peft_model(self, names: list[str], *, stack_weights: bool = True):
        """:meth:`peft_model` over the bare base, for a state with nothing merged: built once per set of
        adapters (by their configs) and dtype, then given the current base and adapter weights each time
        (building peft models was most of this test's time). Never merged or changed otherwise, so
        nothing of an earlier call stays in it."""
        key = (self.dtype, tuple((n, repr(self.model.peft_config[n])) for n in names))
        theirs = self.peft_cache.get(key)
        if theirs is None:
            if len(self.peft_cache) >= 4:
                self.peft_cache.clear()
            theirs = self.peft_cache[key] = self.peft_model(self.peft_base(), names, stack_weights=stack_weights)
            return theirs
        with torch.no_grad():
            for key_, value in self.model.base_state_dict().items():  # "linear1.weight", ...
                lname, _, kind = key_.rpartition(".")
                target = theirs.base_model.model.get_submodule(lname)
                getattr(getattr(target, "base_layer", target), kind).copy_(value)
        self.give_adapters(theirs, names, stack_weights=stack_weights, at_merge=False)
        return theirs

    def copy_edits(self, merged: torch.nn.Module) -> None:
        """Apply to peft's merged weights what happened to ours while merged (edits, casts): the same live tensor."""
        with torch.no_grad():
            for lname in self.base_edited:
                target = merged.get_submodule(lname)
                target = getattr(target, "base_layer", target)
                target.weight.copy_(self.model.model.get_submodule(lname).base_layer.weight)

    def peft_output(self) -> torch.Tensor | None:
        """Stock peft's output for the tracked state (None: a state peft has no counterpart for)."""
        if self.disabled and self.merged and self.merged_adapter_edited:
            return None  # peft's unmerge would subtract the edited adapter's delta; ours removes the merged one
        if self.disabled and self.merged and self.dora_base_edited:
            event("peft: none (base edited after a DoRA merge, switched off)")
            return None  # peft's DoRA unmerge divides the edit by m/n; ours keeps the edit as made
        if self.dora_weighted():
            event("peft: none (DoRA at a stack weight other than 1)")
            return None  # peft has no stack weights, and scaling s w is not DoRA's w * term
        names = self.loaded()
        if not names:
            return None
        theirs = self.peft_model(self.peft_base(), names, at_merge=True) if self.merged else self.unmerged_peft_model(names)
        with torch.no_grad():
            if self.disabled:
                if self.merged:
                    theirs.base_model.merge_adapter(list(self.merged))
                    self.copy_edits(theirs.base_model.model)
                with theirs.disable_adapter():
                    return theirs(self.x)
            rest = [n for n in self.active if n not in self.merged]
            if self.merged:  # peft's merge of those adapters, then a peft model over that base runs the rest
                plain = theirs.merge_and_unload(adapter_names=list(self.merged))
                self.copy_edits(plain)
                if not rest:
                    return plain(self.x)
                theirs = self.peft_model(plain, rest)
            elif not rest:
                with theirs.disable_adapter():
                    return theirs(self.x)
            theirs.base_model.set_adapter(rest)
            return theirs(self.x)

    @invariant()
    def stock_peft_agrees(self) -> None:
        expected = self.peft_output()
        if expected is None:
            return
        with torch.no_grad():
            fused = self.model(self.x)
            set_forward_mode(self.model, "exact")
            exact = self.model(self.x)
            set_forward_mode(self.model, "auto")
        _close(fused, expected, self.bound(), "ours (fused) vs stock peft")
        # what was compared (shown by --hypothesis-show-statistics)
        event(f"peft: {self.dtype}, {'weighted' if any(w != 1.0 for w in self.weights.values()) else 'unweighted'}")
        if self.dora_merged or any(_is_dora(layer, n) for _, layer in lora_layers(self.model.model) for n in layer.active_adapters):
            event("peft: DoRA compared" + (" (merged)" if self.dora_merged else "") + (", bit for bit" if self.clean() else ""))
        if self.merged:
            event("peft: all active merged" if set(self.merged) == set(self.active) else "peft: partial merge")
        if self.clean():  # the exact path runs peft's ops in peft's order on peft's merged bits
            assert torch.equal(exact, expected), f"exact path vs stock peft: max |diff| {float((exact - expected).abs().max()):.3g}"
        else:
            _close(exact, expected, self.bound(), "ours (exact) vs stock peft")


def _peft_config(config: LoraConfig):
    """peft's config for ours: ``to_peft_config``, with ``use_dora`` for a DoRA adapter."""
    theirs = to_peft_config(config)
    theirs.use_dora = config.use_dora
    return theirs


SETTINGS = {
    "stateful_step_count": 30,
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
LoraStateMachine.TestCase.settings = settings(max_examples=max(1, int(180 * SCALE)), derandomize=True, **SETTINGS)
test_lora_state_machine = LoraStateMachine.TestCase  # the same sequences every run


class FreshLoraStateMachine(LoraStateMachine):
    """The same machine on sequences drawn from ``FRESH_SEED`` (new each run unless set)."""


def test_lora_state_machine_on_fresh_sequences() -> None:
    replay = f"MNIST_PEFT_PROPERTY_SEED={FRESH_SEED} pytest tests/test_lora_state.py -k fresh"
    print(f"fresh sequences from seed {FRESH_SEED}; replay: {replay}")
    try:
        run_state_machine_as_test(
            seed(FRESH_SEED)(FreshLoraStateMachine),
            settings=settings(max_examples=max(1, int(90 * SCALE)), derandomize=False, database=None, **SETTINGS),
        )
    except BaseException as exc:
        exc.add_note(f"fresh sequences from seed {FRESH_SEED}; replay: {replay}")
        raise

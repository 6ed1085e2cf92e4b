"""Native <-> ``peft`` mapping and the parity harness (``mnist-peft compare``).

Each parity case builds the native model and ``peft.get_peft_model(base, LoraConfig(...))`` from
the same base weights and the same seed, so both draw the same adapter weights, and measures:
seeded init equality, forward, gradients, 100 Adam steps, merged weights, and unmerge.

DoRA cases (:func:`dora_cases`, ``peft.LoraConfig(use_dora=True)`` against :class:`DoraConfig`)
measure the same, with the magnitude vector ``lora_magnitude_vector`` in the init check, its
gradient reported on its own, and the fast inference path held to :func:`fast_path_bound`. A
float64 case builds its pair on the base cast to float64 and copies our adapter weights into
peft's (peft creates its adapter layers in float32 and casts them, so its seeded draws are not
ours); its seeded-init check runs in float32. :func:`unmerge_drift` repeats merge/unmerge: ours puts
the original tensor back, peft divides by the DoRA factor and drifts.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.errors import InvalidArgumentError
from mnist_peft.tuners.dora.config import DoraConfig
from mnist_peft.tuners.dora.magnitude import MAGNITUDE_KEY
from mnist_peft.tuners.lora.config import DEFAULT_ADAPTER, LoraConfig
from mnist_peft.tuners.lora.model import LoraModel, set_forward_mode
from mnist_peft.tuners.lora.targets import lora_layers

__all__ = [
    "ALL_LAYERS",
    "FORWARD_TOLERANCE",
    "GRAD_TOLERANCE",
    "TRAIN_TOLERANCE",
    "MERGE_TOLERANCE_ULPS",
    "FUSED_TOLERANCE",
    "ParityCase",
    "ParityResult",
    "DriftResult",
    "default_cases",
    "dora_cases",
    "drift_case",
    "build_pair",
    "DRIFT_CYCLES",
    "fast_path_bound",
    "unmerge_drift",
    "to_peft_config",
    "native_to_peft_state_dict",
    "peft_to_native_state_dict",
    "run_case",
    "run_parity",
    "max_ulp_distance",
]

FORWARD_TOLERANCE = 0.0  # the exact path runs peft's float ops in peft's order: identical bits
GRAD_TOLERANCE = 0.0  # same forward graph, so autograd runs the same backward kernels
TRAIN_TOLERANCE = 1e-6  # 100 Adam steps from identical grads; the bound (we measure 0.0)
# Our merge runs get_delta_weight's ops ((B @ A), * scaling, + W) like peft, so we measure 0; the
# bound allows 1 ulp of max(|W|, |delta|) per element, the error of one rounding, should a BLAS pick
# another GEMM kernel for the out= buffer (e.g. an FMA-fused one).
MERGE_TOLERANCE_ULPS = 1.0
# The fused inference path sums x.[W;A]^T in a different GEMM and adds the low-rank term with an
# in-place addmm; on MNIST-scale activations (|y| ~ 10) float32 rounding of the reordered sums stays
# far below 1e-4 absolute (measured ~1e-6), which is this bound.
FUSED_TOLERANCE = 1e-4
DTYPES = {"float32": torch.float32, "float64": torch.float64}  # the dtypes a parity case runs in
DRIFT_CYCLES = 1000  # merge/unmerge cycles of unmerge_drift


def fast_path_bound(expected: torch.Tensor, reduction: int) -> float:
    """The largest |fast - exact| DoRA's fast inference path may show on outputs ``expected`` (the
    exact path's, which are peft's bits), for DoRA layers whose rows have at most ``reduction`` inputs::

        sqrt(reduction) * eps * max|expected|        (eps of expected's dtype)

    Why: the fast path runs the same GEMMs as the exact one (the base output, ``(x A^T) B^T``); it
    differs in the row norm ``n = ||W + s B A||`` (one ``addmm`` instead of ``B(A(I))^T``, then
    ``W + s L``: each element one or two roundings apart) and in combining ``(f - 1) base +
    (f s) lora`` in place (f = m / n). A DoRA output is ``f z + b``, so a relative error d of f moves it
    by d |y|; d is the inputs' rounding (~eps) plus the norm's sum of ``reduction`` squares, each side
    rounding each partial sum to within u = eps/2, errors of independent sign adding like a random
    walk (Higham and Mary 2019: ~sqrt(n) u). An earlier layer's error reaches the outputs scaled as
    the signal is (ReLU is 1-Lipschitz). sqrt(n) eps is twice that walk: 44.7 eps * max|y| at n = 2,000
    (MnistMLP's longest row; 5.3e-6 * max|y| in float32, 9.9e-15 * max|y| in float64). Measured on the
    cases of :func:`dora_cases` (r 1, 4, 16) on a random and the registry's base: at most 6.0 eps * max|y|
    in float32 and 5.5 in float64, so a path that lost a few bits more (a float16 step, a stale norm,
    a dropped term) fails it.
    """
    eps = torch.finfo(expected.dtype).eps
    return math.sqrt(reduction) * eps * float(expected.abs().max())


@dataclass(frozen=True)
class ParityCase:
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    use_dora: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise InvalidArgumentError(f"parity case dtype {self.dtype!r} is not supported; use one of {', '.join(DTYPES)}")

    @property
    def name(self) -> str:
        """``r4-a8-linear1+linear2+linear3``; DoRA: ``dora-`` before it; float64: ``-float64`` after it."""
        rs = "-rslora" if self.use_rslora else ""
        kind = "dora-" if self.use_dora else ""
        dtype = "" if self.dtype == "float32" else f"-{self.dtype}"
        return f"{kind}r{self.r}-a{self.lora_alpha:g}{rs}-{'+'.join(self.target_modules)}{dtype}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def config(self, init: bool | str = False) -> LoraConfig:
        kind = DoraConfig if self.use_dora else LoraConfig
        return kind(
            r=self.r,
            lora_alpha=self.lora_alpha,
            use_rslora=self.use_rslora,
            target_modules=list(self.target_modules),
            init_lora_weights=init,
        )


@dataclass
class ParityResult:
    case: str
    init_equal: bool
    adapter_effect: float
    forward_max_diff: float
    fused_max_diff: float
    grad_max_diff: float
    train_max_diff: float
    merged_max_ulps: float
    unmerge_exact: bool
    peft_unmerge_drift: float
    passed: bool
    magnitude_grad_max_diff: float | None = None  # DoRA: max |grad of m, ours - peft's|
    fast_bound: float | None = None  # DoRA: fast_path_bound() of this case, which fused_max_diff is held to

    def to_dict(self) -> dict[str, object]:
        """The fields; a LoRA case (no DoRA fields) gives the keys it always gave."""
        d = asdict(self)
        for key in ("magnitude_grad_max_diff", "fast_bound"):
            if d[key] is None:
                del d[key]
        return d


@dataclass
class DriftResult:
    """:func:`unmerge_drift`: ``cycles`` merge/unmerge cycles on both sides; max |W - W_original| of peft's
    base weights after the first and after the last cycle; whether ours is ``torch.equal`` to the
    original after the first and after the last."""

    case: str
    cycles: int
    ours_exact: bool
    peft_drift_first: float
    peft_drift_last: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


ALL_LAYERS = ("linear1", "linear2", "linear3")
SUBSET = ("linear1", "linear3")


def default_cases(ranks: Sequence[int] = (1, 4, 16)) -> list[ParityCase]:
    """r in ranks x alpha in {1, r, 2r} x rsLoRA on/off x {all three layers, a subset}."""
    subsets = (ALL_LAYERS, SUBSET)
    cases = []
    for r, rs, targets in itertools.product(ranks, (False, True), subsets):
        for alpha in sorted({1, r, 2 * r}):
            cases.append(ParityCase(r, alpha, rs, targets))
    return cases


def dora_cases(ranks: Sequence[int] = (1, 4, 16), dtypes: Sequence[str] = ("float32", "float64")) -> list[ParityCase]:
    """DoRA, per dtype and r: alpha 2r on all three layers (scaling 2, the digit recipes'), alpha 3r with
    rsLoRA on all three (scaling 3 sqrt(r): not a power of two, so ``x * s`` rounds), alpha 1 on a subset."""
    cases = []
    for dtype, r in itertools.product(dtypes, ranks):
        cases += [
            ParityCase(r, 2 * r, False, ALL_LAYERS, use_dora=True, dtype=dtype),
            ParityCase(r, 3 * r, True, ALL_LAYERS, use_dora=True, dtype=dtype),
            ParityCase(r, 1, False, SUBSET, use_dora=True, dtype=dtype),
        ]
    return cases


# ----------------------------------------------------------------------------- mapping
def to_peft_config(config: LoraConfig):  # -> peft.LoraConfig
    """The ``peft.LoraConfig`` with the same semantics as a native config."""
    import peft

    init = True if config.init_lora_weights == "seed" else config.init_lora_weights
    return peft.LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
        init_lora_weights=init,
        bias="none",
    )


def native_to_peft_state_dict(state: dict[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """``linear1.lora_A.weight`` -> ``base_model.model.linear1.lora_A.<adapter>.weight`` (peft's live keys);
    DoRA's ``linear1.lora_magnitude_vector`` -> ``base_model.model.linear1.lora_magnitude_vector.<adapter>.weight``."""
    out = {}
    for k, v in state.items():
        if k.endswith(f".{MAGNITUDE_KEY}"):
            module, part = k.rsplit(".", 1)
        else:
            module, part, _ = k.rsplit(".", 2)
        out[f"base_model.model.{module}.{part}.{adapter_name}.weight"] = v
    return out


def peft_to_native_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`native_to_peft_state_dict` (LoRA keys and DoRA's magnitude vectors, live or as
    peft saves them: ``...<module>.lora_magnitude_vector``; other keys are left out)."""
    out = {}
    for k, v in state.items():
        if f".{MAGNITUDE_KEY}" in k:
            module = k.removeprefix("base_model.model.").split(f".{MAGNITUDE_KEY}")[0]
            out[f"{module}.{MAGNITUDE_KEY}"] = v
            continue
        if ".lora_A." not in k and ".lora_B." not in k:
            continue
        k = k.removeprefix("base_model.model.")
        module, part, *_ = k.replace(".lora_A.", "|lora_A|").replace(".lora_B.", "|lora_B|").split("|")
        out[f"{module}.{part}.weight"] = v
    return out


def max_ulp_distance(a: torch.Tensor, b: torch.Tensor, *operands: torch.Tensor) -> float:
    """Largest |a - b| in units of the float spacing at max(|a|, |b|, |operands|...)."""
    mag = torch.maximum(a.abs(), b.abs())
    for t in operands:
        mag = torch.maximum(mag, t.abs())
    ulp = torch.nextafter(mag, torch.full_like(mag, float("inf"))) - mag
    return float(((a - b).abs() / ulp).max())


def _lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p for k, p in model.named_parameters() if "lora_" in k and p.requires_grad}


# ----------------------------------------------------------------------------- one case
def run_case(
    case: ParityCase,
    base: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    train_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    seed: int = 0,
) -> ParityResult:
    """Native vs peft on one configuration (see the module docstring)."""
    init_equal = _seeded_init_equal(case, base, seed)
    ours, theirs, drawn_equal = build_pair(case, base, seed=seed + 1)
    init_equal = init_equal and drawn_equal
    dtype = case.torch_dtype
    x = x.to(dtype)
    train_batches = [(xb.to(dtype), yb) for xb, yb in train_batches]
    adapter_effect, forward_diff, fused_diff, fast_bound = _forward_diffs(_cast(base, dtype), ours, theirs, x)
    grad_diff, magnitude_grad, train_diff = _training_diffs(ours, theirs, x, y, train_batches)
    merged_ulps, unmerge_exact, drift = _merge_diffs(ours, theirs)
    passed = (
        init_equal
        and adapter_effect > 0
        and forward_diff <= FORWARD_TOLERANCE
        and fused_diff <= (FUSED_TOLERANCE if fast_bound is None else fast_bound)
        and grad_diff <= GRAD_TOLERANCE
        and (magnitude_grad is None or magnitude_grad <= GRAD_TOLERANCE)
        and train_diff <= TRAIN_TOLERANCE
        and merged_ulps <= MERGE_TOLERANCE_ULPS
        and unmerge_exact
    )
    return ParityResult(
        case=case.name,
        init_equal=init_equal,
        adapter_effect=adapter_effect,
        forward_max_diff=forward_diff,
        fused_max_diff=fused_diff,
        grad_max_diff=grad_diff,
        train_max_diff=train_diff,
        merged_max_ulps=merged_ulps,
        unmerge_exact=unmerge_exact,
        peft_unmerge_drift=drift,
        passed=passed,
        magnitude_grad_max_diff=magnitude_grad,
        fast_bound=fast_bound,
    )


def _cast(base: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``base`` in ``dtype``."""
    return copy.deepcopy(base).to(dtype)


def _seeded_init_equal(case: ParityCase, base: nn.Module, seed: int) -> bool:
    """1. Seeded default init: the same seed gives the same lora_A, lora_B (and DoRA's m) as peft (peft's
    draw order replayed). In float32, whatever the case's dtype: peft draws its adapters in float32."""
    import peft

    torch.manual_seed(seed)
    ours = LoraModel(_cast(base, torch.float32), case.config(init=True))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(_cast(base, torch.float32), to_peft_config(case.config(init=True)))
    return _same_lora(ours, theirs)


def build_pair(case: ParityCase, base: nn.Module, *, seed: int) -> tuple[LoraModel, nn.Module, bool]:
    """Ours and peft's model of ``case`` on ``base`` cast to the case's dtype, non-trivial adapters (init
    False: B != 0), in eval mode, and whether both drew the same adapter weights from ``seed``.

    In float32 both draw from the same seed (the bool says whether the draws agree). In another dtype
    peft draws its adapter layers in float32 and casts them, ours draws in the dtype: our adapter
    weights are copied into peft's, and the bool is True (nothing to compare)."""
    import peft

    dtype = case.torch_dtype
    torch.manual_seed(seed)
    ours = LoraModel(_cast(base, dtype), case.config(init=False)).eval()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(_cast(base, dtype), to_peft_config(case.config(init=False))).eval()
    if dtype == torch.float32:
        return ours, theirs, _same_lora(ours, theirs)
    live = {_norm(k): p for k, p in theirs.named_parameters() if "lora_" in k}
    mine = {_norm(k): v for k, v in ours.lora_state_dict().items()}
    if live.keys() != mine.keys():
        raise InvalidArgumentError(f"LoRA tensors do not line up: {sorted(mine)} vs {sorted(live)}")
    with torch.no_grad():
        for k, p in live.items():
            p.copy_(mine[k])
    return ours, theirs, True


def _forward_diffs(base: nn.Module, ours: LoraModel, theirs: nn.Module, x: torch.Tensor) -> tuple[float, float, float, float | None]:
    """The adapter's effect, ours (exact path) vs peft, our fused/fast path vs our exact path, and the
    fast path's bound (:func:`fast_path_bound`) when a DoRA adapter is on (None: ``FUSED_TOLERANCE``)."""
    with torch.no_grad():
        y_base = base.eval()(x)
        set_forward_mode(ours, "exact")
        y_ours = ours(x)
        set_forward_mode(ours, "auto")
        y_fused = ours(x)
        y_theirs = theirs(x)
    dora_rows = [layer.in_features for _, layer in lora_layers(ours.model) if any(v.name == "dora" for v in layer.variants.values())]
    bound = fast_path_bound(y_ours, max(dora_rows)) if dora_rows else None
    return (
        float((y_ours - y_base).abs().max()),
        float((y_ours - y_theirs).abs().max()),
        float((y_fused - y_ours).abs().max()),
        bound,
    )


def _training_diffs(
    ours: LoraModel, theirs: nn.Module, x: torch.Tensor, y: torch.Tensor, train_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, float | None, float]:
    """3. Gradients for one batch: of lora_A and lora_B, and of DoRA's magnitude vectors (None without);
    4. every adapter tensor after Adam on the same batches."""
    ours.train(), theirs.train()
    F.cross_entropy(ours(x), y).backward()
    F.cross_entropy(theirs(x), y).backward()
    grads = [{k: p.grad for k, p in m.named_parameters() if p.grad is not None} for m in (ours, theirs)]
    grad_diff = _max_diff(*({k: g for k, g in d.items() if MAGNITUDE_KEY not in k} for d in grads))
    magnitudes = [{k: g for k, g in d.items() if MAGNITUDE_KEY in k} for d in grads]
    magnitude_grad = _max_diff(*magnitudes) if any(magnitudes) else None
    opt_o = torch.optim.Adam(list(_lora_params(ours).values()), lr=1e-3)
    opt_t = torch.optim.Adam(list(_lora_params(theirs).values()), lr=1e-3)
    for xb, yb in train_batches:
        for model, opt in ((ours, opt_o), (theirs, opt_t)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    ours.eval(), theirs.eval()
    return grad_diff, magnitude_grad, _max_diff(_lora_state(ours), _lora_state(theirs))


def _merge_diffs(ours: LoraModel, theirs: nn.Module) -> tuple[float, bool, float]:
    """5. Merged weights (ulps from peft's), then unmerge: ours bit-exact, peft's drift reported."""
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(ours.model)}
    with torch.no_grad():
        deltas = {n: theirs.base_model.model.get_submodule(n).get_delta_weight(DEFAULT_ADAPTER) for n in originals}
    ours.merge()
    theirs.merge_adapter()
    merged_ulps = 0.0
    for n, layer in lora_layers(ours.model):
        theirs_w = theirs.base_model.model.get_submodule(n).base_layer.weight.detach()
        merged_ulps = max(merged_ulps, max_ulp_distance(layer.base_layer.weight.detach(), theirs_w, originals[n], deltas[n]))
    ours.unmerge()
    theirs.unmerge_adapter()
    unmerge_exact = all(torch.equal(originals[n], layer.base_layer.weight) for n, layer in lora_layers(ours.model))
    drift = max(float((originals[n] - theirs.base_model.model.get_submodule(n).base_layer.weight).abs().max()) for n in originals)
    return merged_ulps, unmerge_exact, drift


def drift_case(dtype: str = "float32") -> ParityCase:
    """The case :func:`unmerge_drift` runs by default: DoRA, r=4, alpha 8 (the digit recipes') on ``linear3``.

    One layer, the output layer (10 x 2,000 weights), because 1,000 cycles on all three layers (2.8M
    weights) take about 36 s in float32 and 96 s in float64 on this project's 2-core VM (per-cycle
    times of both sides over 100 cycles), against under a second here; the drift is a rounding of
    each element on its own, so a layer's size changes how many elements drift, not how far (on all
    three layers peft drifted by at most 7.5e-9 in float32 and 1.4e-17 in float64, after 1 cycle as
    after 1,000)."""
    return ParityCase(4, 8, False, ("linear3",), use_dora=True, dtype=dtype)


def unmerge_drift(base: nn.Module, case: ParityCase | None = None, *, cycles: int = DRIFT_CYCLES, seed: int = 1) -> DriftResult:
    """Merge and unmerge the adapter of ``case`` (default :func:`drift_case`) ``cycles`` times on both sides,
    under ``no_grad``, from the pair :func:`build_pair` makes with ``seed``. Ours puts the original tensor
    back each time (``torch.equal`` checked after the first and the last cycle); peft's DoRA unmerge
    divides the merged weight by the merge's factor and subtracts the delta, so its weights drift: max
    |W - W_original| over the adapted layers after the first and the last cycle.

    Raises:
        InvalidArgumentError: ``cycles`` < 1.
    """
    if cycles < 1:
        raise InvalidArgumentError(f"cycles must be at least 1, got {cycles}")
    case = case or drift_case()
    ours, theirs, _ = build_pair(case, base, seed=seed)
    theirs_model = theirs.base_model.model
    originals = {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(ours.model)}

    def ours_equal() -> bool:
        return all(torch.equal(originals[n], layer.base_layer.weight) for n, layer in lora_layers(ours.model))

    def peft_drift() -> float:
        return max(float((originals[n] - theirs_model.get_submodule(n).base_layer.weight).abs().max()) for n in originals)

    with torch.no_grad():
        exact = True
        for i in range(cycles):
            ours.merge()
            ours.unmerge()
            if i in (0, cycles - 1):
                exact = exact and ours_equal()
        for i in range(cycles):
            theirs.merge_adapter()
            theirs.unmerge_adapter()
            if i == 0:
                first = peft_drift()
        last = peft_drift()
    return DriftResult(case=case.name, cycles=cycles, ours_exact=exact, peft_drift_first=first, peft_drift_last=last)


def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model, LoraModel):
        return model.lora_state_dict()
    return peft_to_native_state_dict(dict(model.named_parameters()))


def _same_lora(ours: LoraModel, theirs: nn.Module) -> bool:
    a, b = _lora_state(ours), _lora_state(theirs)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _max_diff(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """Max |diff| over LoRA tensors, matched by module and part (names differ between the two)."""
    a = {_norm(k): v for k, v in ours.items() if "lora_" in k}
    b = {_norm(k): v for k, v in theirs.items() if "lora_" in k}
    if a.keys() != b.keys() or not a:
        raise InvalidArgumentError(f"LoRA tensors do not line up: {sorted(a)} vs {sorted(b)}")
    return max(float((a[k] - b[k]).detach().abs().max()) for k in a)


def _norm(key: str) -> str:
    """A LoRA tensor's ``<module>.lora_A``/``lora_B``/``lora_magnitude_vector``, from ours' or peft's name."""
    key = key.removeprefix("model.").removeprefix("base_model.model.")
    if f".{MAGNITUDE_KEY}" in key:
        return f"{key.split(f'.{MAGNITUDE_KEY}')[0]}.{MAGNITUDE_KEY}"
    for part in ("lora_A", "lora_B"):
        if f".{part}." in key:
            module = key.split(f".{part}.")[0]
            return f"{module}.{part}"
    return key


# ----------------------------------------------------------------------------- the grid
def run_parity(
    base: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cases: Iterable[ParityCase] | None = None,
    *,
    steps: int = 100,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> list[ParityResult]:
    """Run every case on ``base`` with inputs ``x`` (N, 784) and labels ``y``.

    The first ``batch_size`` samples are the forward/gradient batch; training cycles through
    ``steps`` batches of ``x``.
    """
    from mnist_peft.progress import Progress

    cases = list(cases) if cases is not None else default_cases()
    n = x.shape[0]
    batches = [
        (x[(i * batch_size) % n : (i * batch_size) % n + batch_size], y[(i * batch_size) % n : (i * batch_size) % n + batch_size])
        for i in range(steps)
    ]
    results = []
    with Progress(len(cases), "parity", enabled=progress, unit="case") as bar:
        for case in cases:
            results.append(run_case(case, base, x[:batch_size], y[:batch_size], train_batches=batches, seed=seed))
            bar.update()
    return results

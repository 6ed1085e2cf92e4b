"""Native <-> ``peft`` mapping and the parity harness (``mnist-peft compare``).

Each parity case builds the native model and ``peft.get_peft_model(base, LoraConfig(...))`` from
the same base weights and the same seed, so both draw the same adapter weights, and measures:
seeded init equality, forward, gradients, 100 Adam steps, merged weights, and unmerge.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mnist_peft.errors import InvalidArgumentError
from mnist_peft.tuners.lora.config import DEFAULT_ADAPTER, LoraConfig
from mnist_peft.tuners.lora.model import LoraModel, set_forward_mode
from mnist_peft.tuners.lora.targets import lora_layers

__all__ = [
    "FORWARD_TOLERANCE",
    "GRAD_TOLERANCE",
    "TRAIN_TOLERANCE",
    "MERGE_TOLERANCE_ULPS",
    "FUSED_TOLERANCE",
    "ParityCase",
    "ParityResult",
    "default_cases",
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


@dataclass(frozen=True)
class ParityCase:
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]

    @property
    def name(self) -> str:
        rs = "-rslora" if self.use_rslora else ""
        return f"r{self.r}-a{self.lora_alpha:g}{rs}-{'+'.join(self.target_modules)}"

    def config(self, init: bool | str = False) -> LoraConfig:
        return LoraConfig(
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

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def default_cases(ranks: Sequence[int] = (1, 4, 16)) -> list[ParityCase]:
    """r in ranks x alpha in {1, r, 2r} x rsLoRA on/off x {all three layers, a subset}."""
    subsets = (("linear1", "linear2", "linear3"), ("linear1", "linear3"))
    cases = []
    for r, rs, targets in itertools.product(ranks, (False, True), subsets):
        for alpha in sorted({1, r, 2 * r}):
            cases.append(ParityCase(r, alpha, rs, targets))
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
        init_lora_weights=init,
        bias="none",
    )


def native_to_peft_state_dict(state: dict[str, torch.Tensor], adapter_name: str = DEFAULT_ADAPTER) -> dict[str, torch.Tensor]:
    """``linear1.lora_A.weight`` -> ``base_model.model.linear1.lora_A.<adapter>.weight`` (peft's live keys)."""
    out = {}
    for k, v in state.items():
        module, part, _ = k.rsplit(".", 2)
        out[f"base_model.model.{module}.{part}.{adapter_name}.weight"] = v
    return out


def peft_to_native_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`native_to_peft_state_dict` (LoRA keys only)."""
    out = {}
    for k, v in state.items():
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
    import peft

    # 1. seeded default init: the same seed gives the same lora_A (peft's draw order replayed)
    torch.manual_seed(seed)
    ours0 = LoraModel(copy.deepcopy(base), case.config(init=True))
    torch.manual_seed(seed)
    theirs0 = peft.get_peft_model(copy.deepcopy(base), to_peft_config(case.config(init=True)))
    init_equal = _same_lora(ours0, theirs0)
    # 2. non-trivial adapters (init False: B != 0), same seed -> same weights on both sides
    torch.manual_seed(seed + 1)
    ours = LoraModel(copy.deepcopy(base), case.config(init=False)).eval()
    torch.manual_seed(seed + 1)
    theirs = peft.get_peft_model(copy.deepcopy(base), to_peft_config(case.config(init=False))).eval()
    init_equal = init_equal and _same_lora(ours, theirs)
    adapter_effect, forward_diff, fused_diff = _forward_diffs(base, ours, theirs, x)
    grad_diff, train_diff = _training_diffs(ours, theirs, x, y, train_batches)
    merged_ulps, unmerge_exact, drift = _merge_diffs(ours, theirs)
    passed = (
        init_equal
        and adapter_effect > 0
        and forward_diff <= FORWARD_TOLERANCE
        and fused_diff <= FUSED_TOLERANCE
        and grad_diff <= GRAD_TOLERANCE
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
    )


def _forward_diffs(base: nn.Module, ours: LoraModel, theirs: nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
    """The adapter's effect, ours (exact path) vs peft, and our fused path vs our exact path."""
    with torch.no_grad():
        y_base = base.eval()(x)
        set_forward_mode(ours, "exact")
        y_ours = ours(x)
        set_forward_mode(ours, "auto")
        y_fused = ours(x)
        y_theirs = theirs(x)
    return float((y_ours - y_base).abs().max()), float((y_ours - y_theirs).abs().max()), float((y_fused - y_ours).abs().max())


def _training_diffs(
    ours: LoraModel, theirs: nn.Module, x: torch.Tensor, y: torch.Tensor, train_batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[float, float]:
    """3. Gradients of every LoRA parameter for one batch; 4. LoRA weights after Adam on the same batches."""
    ours.train(), theirs.train()
    F.cross_entropy(ours(x), y).backward()
    F.cross_entropy(theirs(x), y).backward()
    grad_diff = _max_diff(
        {k: p.grad for k, p in ours.named_parameters() if p.grad is not None},
        {k: p.grad for k, p in theirs.named_parameters() if p.grad is not None},
    )
    opt_o = torch.optim.Adam(list(_lora_params(ours).values()), lr=1e-3)
    opt_t = torch.optim.Adam(list(_lora_params(theirs).values()), lr=1e-3)
    for xb, yb in train_batches:
        for model, opt in ((ours, opt_o), (theirs, opt_t)):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    ours.eval(), theirs.eval()
    return grad_diff, _max_diff(_lora_state(ours), _lora_state(theirs))


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
    key = key.removeprefix("model.").removeprefix("base_model.model.")
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

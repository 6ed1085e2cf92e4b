"""Combine adapters into one, and low-rank factors from SVD (the seed's ``svd.ipynb``, as tools).

The method is looked up by name in the table of :mod:`mnist_peft.merging.methods`:

- ``cat``: exact. A = [A_1; ...; A_k], B = [w_1 s_1 B_1 | ... | w_k s_k B_k]; rank = sum of ranks and
  B A = sum_i w_i s_i B_i A_i up to float rounding; any weights, negative ones included.
- ``svd``: the rank-k truncation of that summed delta, per layer, with its relative Frobenius error.
  The SVD is taken of the small R x R core of the factors (QR of B and of A^T), never of the dense
  (out, in) delta, so it is exact and cheap; k >= R reproduces the sum to float rounding.
- The task-vector merges (:mod:`mnist_peft.merging.task_vectors`: ``task_arithmetic``, ``ties``,
  ``dare_linear``, ``dare_ties``, ``magnitude_prune``), on each adapter's full update
  ``delta_t = s_t B_t A_t`` per layer, then factored back to rank r by truncated SVD (relative
  Frobenius error reported per layer), exactly as peft's
  ``add_weighted_adapter(..., combination_type="<method>_svd")`` does (its names are accepted).

  Differences from peft, on purpose: with a single adapter peft falls back to its ``linear``
  combination (no trimming); we apply the method asked for. Layers are visited in sorted name
  order (peft: module order; the same for ``linear1..3``), which orders DARE's random draws.

DoRA adapters are refused by every method, before any work (:func:`require_additive`): a DoRA layer
rescales each output row by ``m / ||W + s B A||``, which depends on the base weight and on whatever
else is added to it, so its effect is not a delta that sums; no combination of factors or deltas
equals it. (peft's ``add_weighted_adapter`` does not refuse: it combines A and B and silently ignores
the inputs' magnitude vectors; the result gets a fresh one, computed from the base when it is made.) DoRA adapters are stacked at inference (``eval --adapter A --adapter B``)
or merged into the base (``merge``) instead.

peft's ``cat`` splits the weight between A and B as peft always has (``w`` on A), so it accepts
negative weights too. It was peft's factor-space ``linear``, ``ties`` and ``dare`` merges (before
0.18) that needed non-negative weights: they sum the A's and the B's separately,
(sum_i sqrt(w_i s_i) B_i)(sum_j sqrt(w_j s_j) A_j), which adds cross terms B_i A_j (i != j); that is
not the weighted sum of the deltas, and we do not offer it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from mnist_peft.errors import AdapterConfigError, FingerprintMismatchError, MergeError
from mnist_peft.io.adapters import AdapterFiles
from mnist_peft.numerics import require_finite
from mnist_peft.tuners.lora.config import LoraConfig, compute_scaling
from mnist_peft.tuners.lora.state_dict import check_bounded_updates

from .methods import (
    MIN_DENSITY,
    MergeMethod,
    check_density,
    check_seed,
    check_weights,
    density_method_names,
    get_merge_method,
    merge_deltas,
)
from .svd import svd_factors

__all__ = [
    "CombineResult",
    "combine_adapters",
    "resize_adapter",
    "lora_from_deltas",
    "delta_weights",
    "max_rank",
    "require_additive",
]


@dataclass
class CombineResult:
    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    """``<module>.lora_A.weight`` / ``.lora_B.weight``."""
    relative_error: dict[str, float] = field(default_factory=dict)
    """Per module: ||delta - B A||_F / ||delta||_F of the truncation (0 for ``cat``)."""
    base_fingerprint: str | None = None

    def to_files(self, metadata: dict[str, str] | None = None) -> AdapterFiles:
        meta = dict(metadata or {})
        if self.base_fingerprint:
            meta["base_fingerprint"] = self.base_fingerprint
        return AdapterFiles(config=self.config, state_dict=self.state_dict, metadata=meta)


def _scaled_factors(adapters: Sequence[AdapterFiles], weights: Sequence[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module: (A_cat (R, in), B_cat (out, R)) with w_i * scaling_i folded into B; zero blocks where
    an adapter does not target the module."""
    modules: dict[str, tuple[int, int]] = {}
    for f in adapters:
        for key, t in f.state_dict.items():
            module, part, _ = key.rsplit(".", 2)
            out_f, in_f = modules.get(module, (0, 0))
            modules[module] = (t.shape[0] if part == "lora_B" else out_f, t.shape[1] if part == "lora_A" else in_f)
    factors = {}
    for module, (out_f, in_f) in sorted(modules.items()):
        As, Bs = [], []
        for f, w in zip(adapters, weights, strict=True):
            r, s = f.config.r, compute_scaling(f.config.r, f.config.lora_alpha, f.config.use_rslora)
            A = f.state_dict.get(f"{module}.lora_A.weight")
            B = f.state_dict.get(f"{module}.lora_B.weight")
            if A is None or B is None:
                A, B = torch.zeros(r, in_f), torch.zeros(out_f, r)
            As.append(A.float())
            Bs.append(B.float() * (w * s))
        factors[module] = (torch.cat(As), torch.cat(Bs, dim=1))
    return factors


def _common_fingerprint(adapters: Sequence[AdapterFiles], force: bool) -> str | None:
    fps = {f.base_fingerprint for f in adapters if f.base_fingerprint}
    if len(fps) > 1 and not force:
        a, b = sorted(fps)[:2]
        raise FingerprintMismatchError(
            f"the adapters were trained on different bases ({a[:12]}... and {b[:12]}...); combining them is "
            "meaningless unless you know better (force=True / --force)",
            expected=a,
            actual=b,
        )
    return next(iter(fps)) if len(fps) == 1 else None


def _merge_by_delta(
    adapters: Sequence[AdapterFiles], weights: Sequence[float], method: str, r: int, options: dict[str, object]
) -> tuple[dict[str, torch.Tensor], dict[str, float], list[str]]:
    """Every layer any adapter targets, in sorted order: the adapters holding it, their deltas
    (peft's ``(B @ A) * scaling`` in float32), merged, then truncated to rank ``r``."""
    modules = sorted({k.rsplit(".", 2)[0] for f in adapters for k in f.state_dict})
    seed = options.get("seed")
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None  # type: ignore[call-overload]
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for module in modules:
        held = [(f, w) for f, w in zip(adapters, weights, strict=True) if f"{module}.lora_A.weight" in f.state_dict]
        deltas = [
            (f.state_dict[f"{module}.lora_B.weight"].float() @ f.state_dict[f"{module}.lora_A.weight"].float())
            * compute_scaling(f.config.r, f.config.lora_alpha, f.config.use_rslora)
            for f, _ in held
        ]
        merged = merge_deltas(
            deltas,
            [w for _, w in held],
            method=method,
            density=1.0 if options.get("density") is None else options["density"],  # type: ignore[arg-type]
            majority_sign=str(options.get("majority_sign") or "total"),
            ties_mode=str(options.get("ties_mode") or "peft"),
            generator=generator,
        )
        A, B, errors[module] = svd_factors(merged, r)
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = A.contiguous(), B.contiguous()
    return state, errors, modules


def _combine_factors(
    adapters: Sequence[AdapterFiles], weights: Sequence[float], entry: MergeMethod, r: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, float], int, list[str]]:
    """A ``"factors"`` method on every layer's concatenated, scaled factors; the new rank is what it returns."""
    factors = _scaled_factors(adapters, weights)
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for module, (A, B) in factors.items():
        A_k, B_k, errors[module] = entry.fn(A, B, r)
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = A_k.contiguous(), B_k.contiguous()
    new_r = next(iter(state.values())).shape[0]  # lora_A of the first module: (r, in)
    return state, errors, new_r, sorted(factors)


def _and_list(names: Sequence[str]) -> str:
    """``a, b, c and d``."""
    return f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else "".join(names)


def require_additive(adapters: Sequence[AdapterFiles], *, method: str = "cat") -> None:
    """Refuse any adapter whose effect is not an additive update ``s B A`` (DoRA), naming it, the
    reason and what to do instead: no merge method (``method`` names the one asked for) is defined
    for it. Called by :func:`combine_adapters` and :func:`max_rank` before any work.

    Raises:
        MergeError: an input is a DoRA adapter (or of any other non-LoRA type).
    """
    for i, f in enumerate(adapters):
        kind = getattr(getattr(f, "config", None), "adapter_type", "lora")  # (a stand-in without a config: LoRA)
        if kind == "lora":
            continue
        what = f"adapter {str(f.path)!r}" if f.path else f"input adapter {i + 1}"
        raise MergeError(
            f"{what} is a {'DoRA' if kind == 'dora' else kind} adapter, and the {method} combination is not defined for it: "
            "a DoRA layer rescales each output row by m/||W + s B A||, which depends on the base weight and on the other "
            "adapters, so its effect is no delta that adds up, and no cat, svd or task-vector merge of adapters equals it "
            "(peft's add_weighted_adapter combines A and B and silently ignores the inputs' magnitude vectors: the result "
            "gets a fresh one computed from the base; this refuses instead). "
            "Stack the adapters at inference instead (mnist-peft eval --base BASE --adapter A --adapter B), or merge them "
            "into the base (mnist-peft merge --base BASE --adapter A --adapter B --out DIR); nothing was written"
        )


def combine_adapters(
    adapters: Sequence[AdapterFiles],
    weights: Sequence[float] | None = None,
    *,
    method: str = "cat",
    r: int | None = None,
    force: bool = False,
    density: float | None = None,
    majority_sign: str = "total",
    ties_mode: str = "peft",
    seed: int | None = None,
) -> CombineResult:
    """Combine adapters into one whose delta is sum_i w_i * scaling_i * B_i A_i (``cat``), its rank-r
    truncation (``svd``), or a task-vector merge of the deltas truncated to rank r (``ties``, ...;
    ``density`` for the trimming/dropping ones, ``seed`` for DARE; ``r`` defaults to the largest
    rank). The result has ``lora_alpha == r`` (scaling 1). ``method`` is any name in the table of
    :mod:`mnist_peft.merging.methods`.

    Example:
        >>> res = combine_adapters([read_adapter("a"), read_adapter("b")], [1.0, 0.5], method="svd", r=4)
        >>> res.relative_error  # {'linear1': 0.12, ...}
    """
    if not adapters:
        raise AdapterConfigError("nothing to combine: give at least one adapter")
    entry = get_merge_method(method)
    require_additive(adapters, method=entry.name)
    weights = check_weights([1.0] * len(adapters) if weights is None else list(weights))
    if len(weights) != len(adapters):
        raise AdapterConfigError(f"got {len(weights)} weights for {len(adapters)} adapters; give one --weight per --adapter")
    fingerprint = _common_fingerprint(adapters, force)
    _check_options(adapters, entry, r, density, seed)
    try:
        if entry.kind == "factors":
            state, errors, new_r, modules = _combine_factors(adapters, weights, entry, r)
        else:
            new_r = r if r is not None else max(f.config.r for f in adapters)
            options = {"density": density, "majority_sign": majority_sign, "ties_mode": ties_mode, "seed": seed}
            state, errors, modules = _merge_by_delta(adapters, weights, entry.name, new_r, options)
    except torch.linalg.LinAlgError as exc:  # the inputs are finite and bounded, so this is rare: one line, not "a bug"
        raise MergeError(f"the {entry.name} combination failed: {' '.join(str(exc).split())[:200]}; lower the weights") from None
    config = LoraConfig(r=new_r, lora_alpha=new_r, target_modules=modules)
    # The result is checked before anyone can write it: cat and ties can overflow finite inputs.
    fix = f"the {entry.name} combination overflowed; lower the weights or combine fewer adapters"
    require_finite(state, what=f"the {entry.name} combination", fix=fix)
    check_bounded_updates(config, state)
    return CombineResult(config=config, state_dict=state, relative_error=errors, base_fingerprint=fingerprint)


def max_rank(adapters: Sequence[AdapterFiles], method: str = "svd") -> int:
    """The highest rank any layer's combined update can have: ``min(in, out, sum of the input ranks
    there)`` per layer for a factor method (``svd``), ``min(in, out)`` for a task-vector merge (its
    trimming and dropping can raise the rank of a sum); the largest over the layers."""
    entry = get_merge_method(method)
    require_additive(adapters, method=entry.name)
    sizes: dict[str, list[int]] = {}  # layer -> [in, out, sum of ranks]
    for f in adapters:
        for key, t in f.state_dict.items():
            module, part, _ = key.rsplit(".", 2)
            size = sizes.setdefault(module, [0, 0, 0])
            if part == "lora_A" and t.dim() == 2:
                size[0] = t.shape[1]
                size[2] += t.shape[0]
            elif part == "lora_B" and t.dim() == 2:
                size[1] = t.shape[0]
    caps = [min(n_in, n_out, total) if entry.kind == "factors" else min(n_in, n_out) for n_in, n_out, total in sizes.values()]
    return max(caps, default=0)


def _check_options(adapters: Sequence[AdapterFiles], entry: MergeMethod, r: int | None, density: float | None, seed: int | None) -> None:
    """Every option and every input checked before any work: rank within what the layers allow,
    density and seed in range, each adapter's values finite with bounded outputs (``io.probe``'s check)."""
    if density is not None and not entry.needs_density:
        raise AdapterConfigError(f"--density applies to {_and_list(density_method_names())}, not to {entry.name}")
    if entry.needs_density and density is None:
        raise AdapterConfigError(
            f"the {entry.name} merge needs a density in [{MIN_DENSITY:g}, 1] (--density), the share of each delta it keeps"
        )
    if density is not None:
        check_density(density)
    if seed is not None:
        check_seed(seed)
    for f in adapters:
        where = f"adapter {str(f.path)!r}" if f.path else "an input adapter"
        require_finite(f.state_dict, what=where, fix="the adapter is corrupt; re-train it or use another version")
        check_bounded_updates(f.config, f.state_dict, None if f.path is None else str(f.path))
    if r is None:
        return
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterConfigError(f"rank must be an integer >= 1 (--r), got {str(r)[:40]}")
    highest = max_rank(adapters, entry.name)
    if r > highest:
        raise AdapterConfigError(
            f"--r {r} is above the highest rank any layer's combined update can have ({highest}: "
            f"{'min(in, out, sum of the input ranks)' if entry.kind == 'factors' else 'min(in, out)'} over the layers); use --r <= {highest}"
        )


def resize_adapter(adapter: AdapterFiles, r: int) -> CombineResult:
    """The same adapter at rank ``r`` by truncated SVD (scaling folded in; ``lora_alpha == r``)."""
    return combine_adapters([adapter], [1.0], method="svd", r=r)


def lora_from_deltas(deltas: dict[str, torch.Tensor], r: int) -> CombineResult:
    """Rank-r LoRA factors of dense weight deltas (e.g. ``W_finetuned - W_base`` per module)."""
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for module, delta in sorted(deltas.items()):
        u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        k = min(r, s.shape[0])
        B = (u[:, :k] * s[:k]).float()
        A = vh[:k].float()
        if k < r:
            B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], 1)
            A = torch.cat([A, A.new_zeros(r - k, A.shape[1])])
        state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = A.contiguous(), B.contiguous()
        total = float((s**2).sum())
        errors[module] = math.sqrt(float((s[k:] ** 2).sum()) / total) if total > 0 else 0.0
    return CombineResult(config=LoraConfig(r=r, lora_alpha=r, target_modules=sorted(deltas)), state_dict=state, relative_error=errors)


def delta_weights(
    base: torch.nn.Module, finetuned: torch.nn.Module, modules: Sequence[str] = ("linear1", "linear2", "linear3")
) -> dict[str, torch.Tensor]:
    """``W_finetuned - W_base`` (out, in) per linear module."""
    return {m: (finetuned.get_submodule(m).weight - base.get_submodule(m).weight).detach() for m in modules}

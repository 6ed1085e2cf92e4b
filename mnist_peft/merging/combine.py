"""Combine adapters into one, and low-rank factors from SVD (the seed's ``svd.ipynb``, as tools).

- ``cat``: exact. A = [A_1; ...; A_k], B = [w_1 s_1 B_1 | ... | w_k s_k B_k]; rank = sum of ranks and
  B A = sum_i w_i s_i B_i A_i up to float rounding; any weights, negative ones included.
- ``svd``: the rank-k truncation of that summed delta, per layer, with its relative Frobenius error.
  The SVD is taken of the small R x R core of the factors (QR of B and of A^T), never of the dense
  (out, in) delta, so it is exact and cheap; k >= R reproduces the sum to float rounding.
- The task-vector merges, on each adapter's full update ``delta_t = s_t B_t A_t`` per layer, then
  factored back to rank r by truncated SVD (relative Frobenius error reported per layer), exactly as
  peft's ``add_weighted_adapter(..., combination_type="<method>_svd")`` does (its names are accepted):

  - ``task_arithmetic`` (Ilharco et al. 2022): ``sum_t w_t delta_t``; negative weights remove a behaviour;
  - ``magnitude_prune``: each delta trimmed to its top ``density`` share of entries by magnitude, then summed;
  - ``ties`` (Yadav et al. 2023): trim; elect a sign per entry (``majority_sign`` ``total``: the sign of
    the summed trimmed deltas, ``frequency``: the sign most deltas have); average the weighted entries
    that agree with it (the disjoint mean);
  - ``dare_linear`` / ``dare_ties`` (Yu et al. 2023): drop each entry with probability ``1 - density``
    and rescale the rest by ``1/density`` (seeded), then a weighted sum / the TIES election and mean.

  TIES has two readings. ``ties_mode="peft"`` (default, peft's): the sign is elected on the
  *unweighted* trimmed deltas and the agreeing weighted entries are divided by how many agree.
  ``ties_mode="mergekit"`` (mergekit's): the sign is elected on the *weighted* trimmed deltas and
  the agreeing entries are divided by the sum of the agreeing adapters' weights (so it refuses
  negative weights: they would flip or cancel rather than remove a behaviour).

  Differences from peft, on purpose: with a single adapter peft falls back to its ``linear``
  combination (no trimming); we apply the method asked for. Layers are visited in sorted name
  order (peft: module order; the same for ``linear1..3``), which orders DARE's random draws.

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

from mnist_peft.errors import AdapterConfigError, FingerprintMismatchError
from mnist_peft.io.adapters import AdapterFiles
from mnist_peft.tuners.lora.layer import LoraConfig, compute_scaling

__all__ = [
    "CombineResult",
    "combine_adapters",
    "merge_deltas",
    "METHODS",
    "DELTA_METHODS",
    "PEFT_NAMES",
    "resize_adapter",
    "lora_from_deltas",
    "truncated_factors",
    "svd_factors",
    "delta_weights",
]

DELTA_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PEFT_NAMES = {  # peft's combination_type names for the same definitions
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}
METHODS = ("cat", "svd", *DELTA_METHODS, *PEFT_NAMES)


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


def truncated_factors(A: torch.Tensor, B: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-k factors of B @ A (out, in) without forming it: returns (A_k (k, in), B_k (out, k), rel. error).

    QR of B and of A^T reduce the problem to the SVD of an R x R core: B A = Qb (Rb Ra^T) Qa^T.
    As in the seed's svd.ipynb, B_k = U_k S_k and A_k = V_k^T.
    """
    qb, rb = torch.linalg.qr(B.double())  # (out, R), (R, R)
    qa, ra = torch.linalg.qr(A.double().T)  # (in, R), (R, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # core (R, R)
    k_eff = min(k, s.shape[0])
    B_k = (qb @ u[:, :k_eff]) * s[:k_eff]  # (out, k)
    A_k = vh[:k_eff] @ qa.T  # (k, in)
    if k_eff < k:  # pad to the asked rank with zero directions
        B_k = torch.cat([B_k, B_k.new_zeros(B_k.shape[0], k - k_eff)], 1)
        A_k = torch.cat([A_k, A_k.new_zeros(k - k_eff, A_k.shape[1])])
    total = float((s**2).sum())
    err = math.sqrt(float((s[k_eff:] ** 2).sum()) / total) if total > 0 else 0.0
    return A_k.float(), B_k.float(), err


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


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``int(density * numel)`` entries by magnitude, zero the rest (peft's ``topk`` mask).

    The k-th largest magnitude is found by selection (``numpy.partition``, linear time; ``topk``
    with k in the hundreds of thousands is ~30x slower) and the entries at or above it are kept.
    That is the ``topk`` set whenever exactly k entries reach it; when ties at the threshold make
    more, which of them ``topk`` keeps is its own choice, so ``topk`` itself is used.
    """
    if density >= 1:
        return delta
    k = int(density * delta.numel())
    magnitude = delta.detach().abs().reshape(-1)
    if magnitude.device.type == "cpu" and magnitude.dtype in (torch.float32, torch.float64):
        import numpy as np

        values = magnitude.numpy()
        threshold = np.partition(values, values.size - k)[values.size - k]
        keep = magnitude >= float(threshold)
        if int(keep.sum()) == k:
            return delta * keep.reshape(delta.shape).to(delta.dtype)
    keep = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    keep[torch.topk(magnitude, k=k, largest=True).indices] = 1
    return delta * keep.reshape(delta.shape)


def _drop(delta: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescaled by ``1/density``."""
    if density >= 1:
        return delta
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def _disjoint_mean(stacked: torch.Tensor, w: torch.Tensor, majority_sign: str, ties_mode: str) -> torch.Tensor:
    """TIES: elect a sign per entry, then average the (weighted) entries that agree with it."""
    weighted = stacked * w
    voters = stacked if ties_mode == "peft" else weighted
    sign = voters.sign()
    if majority_sign == "total":
        votes = voters.sum(dim=0)
    elif majority_sign == "frequency":
        votes = sign.sum(dim=0)
    else:
        raise AdapterConfigError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    agree = sign == torch.where(votes >= 0, 1, -1)
    if ties_mode == "peft":
        return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
    total = (agree * w).sum(dim=0)
    return (weighted * agree).sum(dim=0) / torch.where(total == 0, torch.ones_like(total), total)


def merge_deltas(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    method: str,
    density: float = 1.0,
    majority_sign: str = "total",
    ties_mode: str = "peft",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One layer's merged update from the adapters' full updates ``delta_t`` (see the module docstring).

    Raises:
        AdapterConfigError: an unknown method, sign rule or TIES mode, or a density outside (0, 1].
    """
    method = PEFT_NAMES.get(method, method)
    if method not in DELTA_METHODS:
        raise AdapterConfigError(f"unknown merge method {method!r}; use one of {', '.join(DELTA_METHODS)}")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise AdapterConfigError(f"density must be in (0, 1], got {density!r}")
    if ties_mode not in ("peft", "mergekit"):
        raise AdapterConfigError(f"ties_mode must be 'peft' or 'mergekit', got {ties_mode!r}")
    if ties_mode == "mergekit" and method in ("ties", "dare_ties") and any(w < 0 for w in weights):
        raise AdapterConfigError(
            "mergekit's TIES votes with the weighted deltas and divides by the agreeing weights, so a negative weight "
            "flips or cancels instead of removing a behaviour; use ties_mode='peft' (or task_arithmetic) for negative weights"
        )
    if method in ("ties", "magnitude_prune") and density < 1 and any(int(density * d.numel()) < 1 for d in deltas):
        raise AdapterConfigError(f"density {density} keeps no entry of a {tuple(deltas[0].shape)} update; raise the density")
    if method in ("ties", "magnitude_prune"):
        deltas = [_trim(d, density) for d in deltas]
    elif method in ("dare_linear", "dare_ties"):
        deltas = [_drop(d, density, generator) for d in deltas]
    stacked = torch.stack(list(deltas))
    w = torch.tensor(list(weights), dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    if method in ("ties", "dare_ties"):
        return _disjoint_mean(stacked, w, majority_sign, ties_mode)
    return (stacked * w).sum(dim=0)


def svd_factors(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """peft's truncation of a merged delta: ``U_r diag(S_r)`` as B, ``Vh_r`` as A; and the relative error."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    B = u[:, :r] @ torch.diag(s[:r])
    A = vh[:r, :]
    if B.shape[1] < r:  # a layer narrower than r (linear3 is 10 wide): zero directions, so the folder has rank r
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], 1)
    total = float((s.double() ** 2).sum())
    err = math.sqrt(float((s[r:].double() ** 2).sum()) / total) if total > 0 else 0.0
    return A, B, err


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
    rank). The result has ``lora_alpha == r`` (scaling 1).

    Example:
        >>> res = combine_adapters([read_adapter("a"), read_adapter("b")], [1.0, 0.5], method="svd", r=4)
        >>> res.relative_error  # {'linear1': 0.12, ...}
    """
    if not adapters:
        raise AdapterConfigError("nothing to combine: give at least one adapter")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise AdapterConfigError(f"got {len(weights)} weights for {len(adapters)} adapters; give one --weight per --adapter")
    if method not in METHODS:
        raise AdapterConfigError(f"unknown combination method {method!r}; use one of {', '.join(METHODS)}")
    fingerprint = _common_fingerprint(adapters, force)
    method = PEFT_NAMES.get(method, method)
    if density is not None and method in ("cat", "svd", "task_arithmetic"):
        raise AdapterConfigError(f"--density applies to ties, dare_linear, dare_ties and magnitude_prune, not to {method}")
    if method in DELTA_METHODS:
        if method != "task_arithmetic" and density is None:
            raise AdapterConfigError(f"the {method} merge needs a density in (0, 1] (--density), the share of each delta it keeps")
        new_r = r if r is not None else max(f.config.r for f in adapters)
        if new_r < 1:
            raise AdapterConfigError(f"rank must be >= 1, got {new_r}")
        options = {"density": density, "majority_sign": majority_sign, "ties_mode": ties_mode, "seed": seed}
        state, errors, modules = _merge_by_delta(adapters, weights, method, new_r, options)
        config = LoraConfig(r=new_r, lora_alpha=new_r, target_modules=modules)
        return CombineResult(config=config, state_dict=state, relative_error=errors, base_fingerprint=fingerprint)
    factors = _scaled_factors(adapters, weights)
    total_r = next(iter(factors.values()))[0].shape[0]
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    if method == "cat":
        new_r = total_r
        for module, (A, B) in factors.items():
            state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = A.contiguous(), B.contiguous()
            errors[module] = 0.0
    else:
        if r is None or r < 1:
            raise AdapterConfigError("the svd method needs a target rank: pass r (--r) >= 1")
        new_r = r
        for module, (A, B) in factors.items():
            A_k, B_k, err = truncated_factors(A, B, r)
            state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"] = A_k.contiguous(), B_k.contiguous()
            errors[module] = err
    config = LoraConfig(r=new_r, lora_alpha=new_r, target_modules=sorted(factors))
    return CombineResult(config=config, state_dict=state, relative_error=errors, base_fingerprint=fingerprint)


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

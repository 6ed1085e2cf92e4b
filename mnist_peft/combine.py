"""Combine adapters into one, and low-rank factors from SVD (the seed's ``svd.ipynb``, as tools).

- ``cat``: exact. A = [A_1; ...; A_k], B = [w_1 s_1 B_1 | ... | w_k s_k B_k]; rank = sum of ranks and
  B A = sum_i w_i s_i B_i A_i up to float rounding. (peft's ``cat`` splits sqrt(w s) between A and B,
  which needs w >= 0; ours puts it all in B, so negative weights work too.)
- ``svd``: the rank-k truncation of that summed delta, per layer, with its relative Frobenius error.
  The SVD is taken of the small R x R core of the factors (QR of B and of A^T), never of the dense
  (out, in) delta, so it is exact and cheap; k >= R reproduces the sum to float rounding.

peft's ``linear`` combination is different: it sums the A's and the B's separately,
(sum_i sqrt(w_i s_i) B_i)(sum_j sqrt(w_j s_j) A_j), which adds cross terms B_i A_j (i != j); it is
not the weighted sum of the deltas, and we do not offer it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .adapters import AdapterFiles
from .errors import AdapterConfigError, FingerprintMismatchError
from .lora import LoraConfig, compute_scaling

__all__ = ["CombineResult", "combine_adapters", "resize_adapter", "lora_from_deltas", "truncated_factors", "delta_weights"]


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


def combine_adapters(
    adapters: Sequence[AdapterFiles],
    weights: Sequence[float] | None = None,
    *,
    method: str = "cat",
    r: int | None = None,
    force: bool = False,
) -> CombineResult:
    """Combine adapters into one whose delta is sum_i w_i * scaling_i * B_i A_i (``cat``) or its rank-r
    truncation (``svd``). The result has ``lora_alpha == r`` (scaling 1).

    Example:
        >>> res = combine_adapters([read_adapter("a"), read_adapter("b")], [1.0, 0.5], method="svd", r=4)
        >>> res.relative_error  # {'linear1': 0.12, ...}
    """
    if not adapters:
        raise AdapterConfigError("nothing to combine: give at least one adapter")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise AdapterConfigError(f"got {len(weights)} weights for {len(adapters)} adapters; give one --weight per --adapter")
    if method not in ("cat", "svd"):
        raise AdapterConfigError(f"unknown combination method {method!r}; use 'cat' (exact) or 'svd' (truncated)")
    fingerprint = _common_fingerprint(adapters, force)
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

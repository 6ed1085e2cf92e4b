"""Low-rank factors by SVD, and the two factor-space combinations of the merge table.

- :func:`svd_factors`: peft's truncation of a dense merged delta (out, in) to rank r;
- :func:`truncated_factors`: the best rank-k factors of ``B @ A`` without forming it. The SVD is
  taken of the small R x R core of the factors (QR of B and of A^T), never of the dense (out, in)
  delta, so it is exact and cheap; k >= R reproduces the product to float rounding;
- :func:`cat_method` and :func:`svd_method`: the ``"factors"`` merge methods ``cat`` (the
  concatenated factors as they are: exact) and ``svd`` (their rank-r truncation). Both receive one
  layer's A = [A_1; ...; A_k] (R, in) and B = [w_1 s_1 B_1 | ... | w_k s_k B_k] (out, R).
"""

from __future__ import annotations

import math

import torch

from mnist_peft.errors import AdapterConfigError

__all__ = ["svd_factors", "truncated_factors", "cat_method", "svd_method"]


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


def cat_method(A: torch.Tensor, B: torch.Tensor, r: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``cat``: the concatenated factors themselves (rank = sum of ranks, error 0); ``r`` is not used."""
    return A, B, 0.0


def svd_method(A: torch.Tensor, B: torch.Tensor, r: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``svd``: the rank-r truncation of the summed delta ``B @ A``.

    Raises:
        AdapterConfigError: no target rank, or one below 1.
    """
    if r is None or r < 1:
        raise AdapterConfigError("the svd method needs a target rank: pass r (--r) >= 1")
    return truncated_factors(A, B, r)

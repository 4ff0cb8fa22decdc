"""The joint K/V latent of an MLA: one down-projection to `rank` dims, one up-projection back to K_nope and V.

`--init svd` (MHA2MLA's SVD_joint) takes the top singular directions of the stacked weights [W_k_nope; W_v];
`--init pca` (TransMLA) takes the top principal directions of the calibration activations [k_nope / a; v], where
a = mean per-channel RMS of k_nope / that of v balances keys against values (the up-projection multiplies a back).
Both are the same computation on a second-moment matrix: W E[xx^T] W^T with E[xx^T] = I for svd (the weights'
Gram matrix, whose eigenvectors are W's left singular vectors) or measured for pca.

For a target z = W x + b and basis V (top eigenvectors), latent c = V^T S z and z ~ S^-1 V c (S the balance
scaling); at rank = dim z (or rank z) the reconstruction is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnconv.errors import AttnconvError

INITS = ("svd", "pca")


@dataclass
class LowRank:
    down: Tensor  # [rank, n]: latent = down @ z
    up: Tensor  # [n, rank]: z ~ up @ latent
    energy: float  # share of E||S z||^2 the latent keeps (1.0 = lossless on the calibration data)


def check_rank(rank: int, max_rank: int, what: str = "--kv-rank",
               dims: str = "NoPE-key and value dims the heads hold") -> None:
    if rank < 1:
        raise AttnconvError(f"{what} must be >= 1, got {rank}")
    if rank > max_rank:
        raise AttnconvError(f"{what} {rank} exceeds the {max_rank} {dims}; choose at most {max_rank}")


def input_moments(init: str, moments, hidden: int):
    """The input second moments the factorisation weighs by: the calibration's for pca, the identity for svd."""
    from attnconv.convert.mla.calibration import InputMoments

    if init not in INITS:
        raise AttnconvError(f"--init {init!r} is not one of {', '.join(INITS)}")
    if init == "pca" and moments is None:
        raise AttnconvError("--init pca needs calibration data; pass --calibrate SPEC (or keep the default text) or "
                            "use --init svd")
    if init == "pca":
        from attnconv import finite

        return finite.statistics(moments)
    return InputMoments.identity(hidden)


def kv_balance(diagonal: Tensor, k_rows: Tensor) -> float:
    """a = mean RMS of the key channels / mean RMS of the value channels (TransMLA's K/V balance), from the
    diagonal of E[z z^T] [n]."""
    rms = diagonal.clamp_min(0).sqrt()
    k, v = rms[k_rows].mean(), rms[~k_rows].mean()
    if not k_rows.any() or not (~k_rows).any() or v <= 0 or k <= 0:
        return 1.0
    return float(k / v)


def top_eigenvectors(sym: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Eigenvalues [rank] and eigenvectors [n, rank] of a symmetric matrix, largest first, in float64."""
    vals, vecs = torch.linalg.eigh(sym.double())
    return vals.flip(0)[:rank], vecs.flip(-1)[:, :rank]


def joint_low_rank(second: Tensor | None, rank: int, k_rows: Tensor | None = None, balance: bool = False, *,
                   factor: Tensor | None = None) -> LowRank:
    """Factor z (with E[z z^T] = second, [n, n]) through a rank-`rank` latent.

    k_rows: [n] bool, which rows of z are NoPE keys (for the K/V balance); balance: apply it (pca init).
    factor: B [n, m] with B B^T = second, in place of it. When m < n (z = W x has rank <= hidden) the
    eigenvectors come from the m x m problem B^T B: an eigh of m^3 instead of n^3 (8x fewer flops for an MHA
    layer, whose K and V rows are twice the hidden size).
    """
    if factor is not None and (factor.shape[1] >= factor.shape[0] or rank > factor.shape[1]):
        second, factor = factor @ factor.T, None
    n = (factor if factor is not None else second).shape[0]
    diag = (factor.double() ** 2).sum(1) if factor is not None else second.double().diagonal()
    scale = torch.ones(n, dtype=torch.float64)
    if balance and k_rows is not None:
        scale[k_rows] = 1.0 / kv_balance(diag, k_rows)
    total = (scale**2 * diag).sum().clamp_min(1e-30)
    if factor is not None:
        scaled = scale[:, None] * factor.double()  # [n, m]
        gram = scaled.T @ scaled  # [m, m]: the same non-zero eigenvalues as scaled @ scaled.T
        vals, small = top_eigenvectors((gram + gram.T) / 2, rank)
        if vals[-1] > 1e-10 * vals[0]:
            vecs = scaled @ small / vals.sqrt()  # [n, rank], orthonormal
        else:  # directions of (near) zero energy: the n x n problem gives them an orthonormal completion
            second, factor = factor @ factor.T, None
    if factor is None:
        balanced = scale[:, None] * second.double() * scale[None, :]
        vals, vecs = top_eigenvectors((balanced + balanced.T) / 2, rank)
    return LowRank((vecs.T * scale[None, :]).float(), (vecs / scale[:, None]).float(),
                   float(vals.clamp_min(0).sum() / total))

"""Head alignment (orthogonal, function-preserving) and least-squares merges, on the Grams of one group of heads.

Both work in head space (d x d blocks from `Geometry`) and return coefficients; gqa/calibrated.py applies them
to the weights. Group index j runs over the G KV heads being merged into one.

Objectives (gqa_heads.key_objective / value_objective), for a group merged into keys kappa and values V, with
inner products under a second moment S of the attention input (for keys and values the attended moment A when
calibration provides it: each token weighted by the attention it receives as a key, so errors on keys no query
looks at do not count; for values A bounds the error of the attention-averaged input by Jensen):
  keys    sum_j sum_p alpha_jp |c_jp kappa_p - kappa_jp|^2: the error of every query head's logits, per RoPE
          pair, averaged over the relative rotation of query and key and with query and key tokens taken as
          independent draws from calibration (alpha_jp = E|z_q|^2 of the query heads of j). Averaging over the
          rotation is what lets a RoPE-commuting map (a complex number c per pair) compensate exactly, and it
          is the right average for the fast pairs, which turn many times over a context; the slow pairs are
          treated as if they turned too (a mild over-smoothing: their exact objective would weight the two dims
          of a pair by the query's 2x2 covariance).
  values  sum_j tr(A_j (F_j V - V_j) S (F_j V - V_j)^T), A_j = sum over j's query heads of O_h^T O_h: the
          error of each head's output through o_proj, with attention weights taken as they are (the output of
          a head is O_h V x_bar, x_bar an attention-weighted mean of inputs, approximated by S).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnconv.convert.gqa.heads import Geometry, Merge, sandwich

_TINY = 1e-30
GPA_ITERS = 50  # generalised Procrustes converges linearly; the merge objective moves little after a few steps
GPA_TOL = 1e-9


def _polar(m: Tensor) -> Tensor:
    """The orthogonal factor of m [..., d, d]: argmax over orthogonal R of tr(R^T m)."""
    u, _, vh = torch.linalg.svd(m)
    return u @ vh


def align_keys(geom: Geometry, rotatable: Tensor) -> Tensor:
    """Unit complex numbers c [G, d/2] that bring each key head's pairs onto a common frame (Procrustes).

    Generalised Procrustes per pair: start by rotating every head onto head 0 (the reference), then
    alternate target = mean of the rotated heads and c_j = the rotation that best fits head j onto it.
    Head 0 keeps its frame. Pairs where `rotatable` [d/2] is False stay as they are (c = 1).
    """
    p = geom.key_gram  # [d/2, G, G]
    g = p.shape[1]

    def phase(z: Tensor) -> Tensor:
        return torch.where(z.abs() > _TINY, z / z.abs().clamp_min(_TINY), torch.ones_like(z))

    c = phase(p[:, :, 0].conj())  # [d/2, G]: max Re(c_j <kappa_j, kappa_0>)
    for _ in range(GPA_ITERS):
        to_target = (p @ c.conj()[:, :, None])[:, :, 0] / g  # <kappa_j, mean_k c_k kappa_k>
        new = phase(to_target.conj())
        new = new * new[:, :1].conj()  # the reference keeps its frame
        done = (new - c).abs().max() < GPA_TOL
        c = new
        if done:
            break
    return torch.where(rotatable[:, None], c, torch.ones_like(c)).T.contiguous()


def align_values(geom: Geometry) -> Tensor:
    """Orthogonal maps R [G, d, d] that bring each value head onto a common frame (generalised Procrustes).

    min sum_j ||R_j V_j - T||_S^2 with T the mean of the rotated heads; head 0 keeps its frame. Any orthogonal
    map is allowed (reflections too): the o_proj columns of the head's queries take R_j^T, so the output is
    unchanged.
    """
    gram = geom.value_gram  # [G, d, G, d]
    g, d = gram.shape[0], gram.shape[1]
    r = torch.stack([_polar(gram[0, :, j]) for j in range(g)])  # onto head 0: T S V_j^T = Gamma_0j
    for _ in range(GPA_ITERS):
        m = sandwich(r, gram, None).sum(0).transpose(0, 1) / g  # T S V_j^T, T = mean_k R_k V_k
        new = _polar(m)
        new = new[0].T @ new
        done = (new - r).abs().max() < GPA_TOL
        r = new
        if done:
            break
    return r.reshape(g, d, d)


def rotated(geom: Geometry, key_phase: Tensor, value_rot: Tensor) -> Geometry:
    """The Grams after `align_*`'s maps: kappa_j -> c_j kappa_j, V_j -> R_j V_j, O_h -> O_h R_j^T."""
    c = key_phase.T  # [d/2, G]
    key_gram = c[:, :, None] * geom.key_gram * c[:, None, :].conj()
    value_gram = sandwich(value_rot, geom.value_gram, value_rot)
    out = value_rot @ geom.output_gram @ value_rot.mT
    return Geometry(key_gram, geom.query_energy, value_gram, out)


def fit_keys(geom: Geometry, rotatable: Tensor | None) -> tuple[Tensor, Tensor]:
    """Merged keys by least squares: (key_mix, key_comp) [G, d/2] complex, minimising the key objective.

    With compensation (each KV head j's query heads take a complex factor per pair, which commutes with RoPE)
    the optimum is a weighted rank-1 approximation per pair: rows sqrt(alpha_j) kappa_j ~ u_j y, u the top
    eigenvector of the Hermitian G x G matrix sqrt(alpha_j alpha_k) <kappa_j, kappa_k> (Eckart-Young). The free
    complex scale of y is set so that the merged key is the closest to the mean of the group's aligned heads
    (`align_keys`), the start `aligned` would merge; a plain mean can cancel (heads in opposite phase).
    With per-head q/k norms (rotatable: [d/2] bool, the pairs whose rotation commutes with them) a non-unit
    factor would change the norm, so the compensation is `align_keys`'s rotation on those pairs, exact, and the
    merged key the optimum given it: the alpha-weighted mean of the aligned heads. rotatable None: no norms.
    """
    p = geom.key_gram  # [d/2, G, G]
    g = p.shape[1]
    w = geom.query_energy.T.clamp_min(_TINY)  # [d/2, G]
    if rotatable is not None:
        phase = align_keys(geom, rotatable).T  # [d/2, G]
        mix = w / w.sum(1, keepdim=True) * phase
        return mix.T.contiguous(), phase.conj().T.contiguous()
    sw = w.sqrt()
    evals, evecs = torch.linalg.eigh(sw[:, :, None] * p * sw[:, None, :])
    u, top = evecs[:, :, -1], evals[:, -1].clamp_min(_TINY)  # [d/2, G], [d/2]
    b = u.conj() * sw  # y = sum_j b_j kappa_j, |y|^2 = top
    phase = align_keys(geom, torch.ones(p.shape[0], dtype=torch.bool)).T  # [d/2, G]
    to_mean = (phase[:, None, :] @ p @ b.conj()[:, :, None])[:, 0, 0] / g  # <mean_j c_j kappa_j, y>
    scale = to_mean / top
    # Heads with no common direction leave no usable scale: keep the heads' typical size.
    typical = (p.diagonal(dim1=1, dim2=2).real.mean(1) / top).sqrt()
    scale = torch.where(scale.abs() ** 2 < 1e-6 * typical**2, typical.to(scale.dtype), scale)
    # A pair whose keys are zero in every head of the group merges to zero whatever the factor: keep factor 1.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    mix = scale[:, None] * b
    comp = u / (sw * scale[:, None])
    return mix.T.contiguous(), comp.T.contiguous()


def fit_values(geom: Geometry, max_gauge_cond: float = 100.0) -> tuple[Tensor, Tensor]:
    """Merged values by least squares: (value_mix, value_comp) [G, d, d], minimising the value objective.

    With a free d x d map per KV head on the o_proj side, the optimum keeps the top-d eigenspace of
    Z Z^T, Z = [B_j V_j S^(1/2)] stacked over the group with B_j^T B_j = A_j (Eckart-Young): the merged value
    head spans the d directions of the group's outputs that carry the most energy. Its basis within that space
    is free; it is chosen as the least-squares fit of the mean of the group's aligned heads (`align_values`: the
    start `aligned` would merge, which unlike a plain mean cannot cancel), so the merged head looks like it;
    should that basis still be ill-conditioned (float32 would lose the weak directions), an orthonormal one.
    The compensation F_j is then the least-squares o_proj map for head j.
    """
    gram, a = geom.value_gram, geom.output_gram  # [G, d, G, d], [G, d, d]
    g, d = gram.shape[0], gram.shape[1]
    eye = torch.eye(d, dtype=a.dtype)
    scale = a.diagonal(dim1=1, dim2=2).mean().clamp_min(_TINY)
    b = torch.linalg.cholesky(a + 1e-10 * scale * eye).mT  # B_j^T B_j = A_j
    zz = sandwich(b, gram, b).reshape(g * d, g * d)
    evals, evecs = torch.linalg.eigh(zz)
    u, top = evecs[:, -d:].reshape(g, d, d), evals[-d:]  # u[j, a, i]: block j of eigenvector i
    keep = top > 1e-12 * top[-1].clamp_min(_TINY)
    basis = u.mT @ b / top.clamp_min(_TINY).sqrt()[:, None]  # W = sum_j basis_j V_j
    basis = basis * keep[None, :, None]  # W S W^T = I on the kept directions
    rot = align_values(geom)
    to_mean = sandwich(rot, gram, basis).sum((0, 2)) / g  # mean_j R_j V_j S W^T
    gauge = to_mean  # argmin_T ||T W - mean||_S when W S W^T = I
    sv = torch.linalg.svdvals(gauge)
    if not keep.all() or sv[0] > max_gauge_cond * sv[-1]:
        gauge = _polar(to_mean) * (sv.square().mean().sqrt())
    mix = gauge @ basis  # C_j
    merged = sandwich(mix, gram, mix).sum((0, 2))  # V S V^T
    cross = sandwich(None, gram, mix).sum(2)  # V_j S V^T
    comp = cross @ torch.linalg.pinv(merged, hermitian=True)
    return mix, comp


def fit_residuals(geom: Geometry) -> tuple[Tensor, Tensor]:
    """The key and value objectives `fit` reaches with full compensation, without building the merge: what the
    top eigenvalues leave (Eckart-Young). Cheap enough to score every candidate group."""
    w = geom.query_energy.T  # [d/2, G]
    sw = w.sqrt()
    key_total = (w * geom.key_gram.diagonal(dim1=1, dim2=2).real).sum()
    key_top = torch.linalg.eigvalsh(sw[:, :, None] * geom.key_gram * sw[:, None, :])[:, -1].sum()
    gram, a = geom.value_gram, geom.output_gram
    g, d = gram.shape[0], gram.shape[1]
    scale = a.diagonal(dim1=1, dim2=2).mean().clamp_min(_TINY)
    b = torch.linalg.cholesky(a + 1e-10 * scale * torch.eye(d, dtype=a.dtype)).mT
    evals = torch.linalg.eigvalsh(sandwich(b, gram, b).reshape(g * d, g * d))
    return key_total - key_top, evals[:-d].sum()


def fitted_merge(geom: Geometry, rotatable: Tensor | None) -> Merge:
    """The least-squares merge of a group; rotatable: see `fit_keys`."""
    key_mix, key_comp = fit_keys(geom, rotatable)
    value_mix, value_comp = fit_values(geom)
    return Merge(key_mix, key_comp, value_mix, value_comp)

"""One attention layer in a family-free form, and the calibration geometry of its heads.

Calibrated GQA/MQA methods (gqa/calibrated.py) see a layer as `AttentionWeights`: q/k/v/o weights in Linear
layout, optional q/k/v biases and optional per-head q/k RMSNorm weights (Qwen3). They work on `Heads`, the
same layer in float64, one tensor per head, with each bias as an extra input column (inputs x~ = [x; 1]), so a
bias follows every map its weight takes and a missing bias stays exactly zero.

RoPE is Hugging Face's rotate_half: pair p of a head is dims (p, p + d/2). Written as the complex number
z = x[p] + i x[p + d/2], RoPE multiplies z by e^{i theta_p pos}; a logit is sum_p Re(z_q conj(z_k)). A map
commutes with RoPE exactly when it multiplies each pair by a complex number, which is how keys are handled.

`Geometry` holds everything the methods need from calibration, as Gram matrices between heads in the metric
of the attention input's second moment S = E[x~ x~^T]: d x d blocks per head pair, never hidden-size work.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from attnconv.convert.attention_weights import AttentionWeights


@dataclass(frozen=True)
class Heads:
    """An `AttentionWeights` per head in float64; the last input column is the bias."""

    q: Tensor  # [n_heads, d, hidden + 1]
    k: Tensor  # [n_kv, d, hidden + 1]
    v: Tensor  # [n_kv, d, hidden + 1]
    o: Tensor  # [n_heads, hidden, d]: the o_proj columns that read each head
    q_norm: Tensor | None
    k_norm: Tensor | None

    @property
    def n_heads(self) -> int:
        return self.q.shape[0]

    @property
    def n_kv(self) -> int:
        return self.k.shape[0]

    @property
    def head_dim(self) -> int:
        return self.k.shape[1]

    @property
    def queries_per_kv(self) -> int:
        return self.n_heads // self.n_kv


def to_heads(layer: AttentionWeights) -> Heads:
    def per_head(w: Tensor, b: Tensor | None, n: int) -> Tensor:
        b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b
        return torch.cat([w, b[:, None]], dim=1).double().reshape(n, layer.head_dim, layer.hidden + 1)

    o = layer.o.double().reshape(layer.hidden, layer.n_heads, layer.head_dim).transpose(0, 1)
    norm = [None if t is None else t.double() for t in (layer.q_norm, layer.k_norm)]
    return Heads(per_head(layer.q, layer.q_bias, layer.n_heads), per_head(layer.k, layer.k_bias, layer.n_kv_heads),
                 per_head(layer.v, layer.v_bias, layer.n_kv_heads), o.contiguous(), *norm)


def from_heads(heads: Heads, like: AttentionWeights) -> AttentionWeights:
    """Back to Linear layout in float32; biases only where `like` has them (the others stayed exactly zero)."""
    def split(w: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
        flat = w.reshape(-1, w.shape[-1]).float()
        return flat[:, :-1].contiguous(), flat[:, -1].contiguous() if has_bias else None

    q, qb = split(heads.q, like.q_bias is not None)
    k, kb = split(heads.k, like.k_bias is not None)
    v, vb = split(heads.v, like.v_bias is not None)
    o = heads.o.transpose(0, 1).reshape(like.hidden, -1).float().contiguous()
    return replace(like, shape=replace(like.shape, n_kv_heads=heads.n_kv), q=q, k=k, v=v, o=o, q_bias=qb, k_bias=kb,
                   v_bias=vb)


def to_pairs(w: Tensor) -> Tensor:
    """[..., d, n] real -> [..., d/2, n] complex: pair p is dims (p, p + d/2), HF rotate_half's RoPE pairs."""
    half = w.shape[-2] // 2
    return torch.complex(w[..., :half, :], w[..., half:, :])


def from_pairs(z: Tensor) -> Tensor:
    return torch.cat([z.real, z.imag], dim=-2)


def ridged(second_moment: Tensor, ridge: float) -> Tensor:
    """S + ridge * mean(diag S) * I in float64: every least-squares solve sees inputs with a floor of noise."""
    s = second_moment.double()
    return s + ridge * s.diagonal().mean() * torch.eye(s.shape[0], dtype=s.dtype)


@dataclass(frozen=True)
class Geometry:
    """Gram matrices of one layer's heads under S; index j runs over KV heads (query heads summed per KV head)."""

    key_gram: Tensor  # [d/2, n_kv, n_kv] complex: <kappa_j, kappa_k> = kappa_j S kappa_k^H per pair
    query_energy: Tensor  # [n_kv, d/2]: sum over the query heads of KV head j of E|z_q|^2 per pair
    value_gram: Tensor  # [n_kv, d, n_kv, d]: V_j S V_k^T
    output_gram: Tensor  # [n_kv, d, d]: sum over the query heads h of KV head j of O_h^T O_h

    def subset(self, idx: list[int]) -> Geometry:
        i = torch.tensor(idx)
        return Geometry(self.key_gram[:, i][:, :, i], self.query_energy[i], self.value_gram[i][:, :, i],
                        self.output_gram[i])

    @property
    def key_energy(self) -> Tensor:
        """Total logit energy sum_j sum_p alpha_jp |kappa_jp|^2: the scale of the key objective (floored: a layer
        with all-zero keys or queries has no logit to lose, and its objectives read 0, not 0/0)."""
        return (self.query_energy * self.key_gram.diagonal(dim1=1, dim2=2).real.T).sum().clamp_min(1e-30)

    @property
    def value_energy(self) -> Tensor:
        """Total output energy sum_j tr(A_j Gamma_jj): the scale of the value objective (floored as key_energy)."""
        return (self.output_gram * diagonal_blocks(self.value_gram).mT).sum().clamp_min(1e-30)


def geometry(heads: Heads, s: Tensor, s_kv: Tensor | None = None) -> Geometry:
    """The Grams of `heads`: query energies under s [hidden + 1, hidden + 1] (all queries count alike), key and
    value Grams under s_kv (default s; the attended second moment weights each key by the attention it gets)."""
    s_kv = s if s_kv is None else s_kv
    n_kv, d, n = heads.k.shape
    kc = to_pairs(heads.k)  # [n_kv, d/2, n]
    ks = torch.complex(kc.real @ s_kv, kc.imag @ s_kv)
    key_gram = ks.transpose(0, 1) @ kc.conj().permute(1, 2, 0)  # [d/2, n_kv, n_kv]
    qc = to_pairs(heads.q)  # [n_heads, d/2, n]
    q_energy = (torch.complex(qc.real @ s, qc.imag @ s) * qc.conj()).real.sum(-1)  # [n_heads, d/2]
    q_energy = q_energy.reshape(n_kv, heads.queries_per_kv, d // 2).sum(1)
    v = heads.v.reshape(n_kv * d, n)
    value_gram = (v @ s_kv @ v.T).reshape(n_kv, d, n_kv, d)
    out = (heads.o.mT @ heads.o).reshape(n_kv, heads.queries_per_kv, d, d).sum(1)
    return Geometry(key_gram, q_energy, value_gram, out)


def sandwich(left: Tensor | None, gram: Tensor, right: Tensor | None) -> Tensor:
    """Blocks left_j gram_jk right_k^T of a [G, d, G, d] block matrix, left/right [G, d, d] (None: identity)."""
    blocks = gram.permute(0, 2, 1, 3)  # [G, G, d, d]: block (j, k)
    if left is not None:
        blocks = left[:, None] @ blocks
    if right is not None:
        blocks = blocks @ right[None].mT
    return blocks.permute(0, 2, 1, 3)


def diagonal_blocks(gram: Tensor) -> Tensor:
    """[G, d, G, d] -> [G, d, d]: the blocks gram_jj."""
    return gram.diagonal(dim1=0, dim2=2).permute(2, 0, 1)


@dataclass(frozen=True)
class Merge:
    """How a group of KV heads becomes one, as coefficients over the group's heads (index j within the group).

    Keys, per RoPE pair p: merged kappa_p = sum_j key_mix[j, p] kappa_jp; the query heads of j are multiplied by
    conj(key_comp[j, p]), so they see key_comp[j, p] * merged (a RoPE-commuting map). Values: merged
    V = sum_j value_mix[j] V_j; the o_proj columns of j's query heads are multiplied by value_comp[j], so they
    read value_comp[j] V. The plain mean is key_mix = value_mix = 1/G with identity compensation.
    """

    key_mix: Tensor  # [G, d/2] complex
    key_comp: Tensor  # [G, d/2] complex
    value_mix: Tensor  # [G, d, d]
    value_comp: Tensor  # [G, d, d]


def mean_merge(group_size: int, head_dim: int) -> Merge:
    eye = torch.eye(head_dim, dtype=torch.float64).expand(group_size, head_dim, head_dim)
    ones = torch.ones(group_size, head_dim // 2, dtype=torch.complex128)
    return Merge(ones / group_size, ones, eye / group_size, eye)


def key_objective(geom: Geometry, merge: Merge) -> Tensor:
    """sum_j sum_p alpha_jp |key_comp_jp * merged_p - kappa_jp|^2: the rotation-averaged logit error (x 2)."""
    p = geom.key_gram  # [d/2, G, G]
    a = merge.key_mix.T  # [d/2, G]
    c = merge.key_comp.T  # [d/2, G]
    cross = (p @ a.conj()[:, :, None])[:, :, 0]  # [d/2, G]: <kappa_j, merged>
    merged_sq = (a * cross).sum(1).real  # |merged|^2
    err = c.abs() ** 2 * merged_sq[:, None] - 2 * (c * cross.conj()).real + p.diagonal(dim1=1, dim2=2).real
    return (geom.query_energy.T * err).sum()


def value_objective(geom: Geometry, merge: Merge) -> Tensor:
    """sum_j tr(A_j (F_j V - V_j) S (F_j V - V_j)^T): the output error through o_proj, V = sum_j C_j V_j."""
    g, c, f = geom.value_gram, merge.value_mix, merge.value_comp
    merged = sandwich(c, g, c).sum((0, 2))  # V S V^T
    cross = sandwich(None, g, c).sum(2)  # [G, d, d]: X_j = V_j S V^T
    err = f @ merged @ f.mT - f @ cross.mT - cross @ f.mT + diagonal_blocks(g)
    return (geom.output_gram * err.mT).sum()

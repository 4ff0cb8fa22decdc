"""One layer as a RoPE key shared by all heads plus a latent: what both output formats with a shared key write.

After TransMLA's RoRoPE (mla/rope.py): per kept pair, the principal axis of the keys across KV heads carries the
shared RoPE key; every KV head keeps the rest of its key as a full NoPE key, which with its value comes from one
latent (mla/lowrank.py). The deepseek-v3 format (deepseek.py) writes this with its interleaved pair order, query
scale and linear latent norm; attnconv's `--rope-key shared` (attnconv_shared.py) as it is, biases included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnconv.convert.attention_weights import AttentionShape, AttentionWeights
from attnconv.convert.mla.calibration import InputMoments
from attnconv.convert.mla.lowrank import check_rank, input_moments, joint_low_rank
from attnconv.convert.mla.rope import apply_phases, principal_rotations, shared_rope_key, shared_rope_queries


def max_kv_rank(shape: AttentionShape, rope_dim: int) -> int:
    """The rank of [NoPE keys; values] of all KV heads: the shared RoPE key takes rope_dim key dims."""
    return 2 * shape.n_kv_heads * shape.head_dim - rope_dim


@dataclass(frozen=True)
class SharedKeyLayer:
    """A layer's attention with one shared RoPE key, per query head, RoPE dims in rotate_half order.

    Weights [rows, hidden] and their biases [rows] (None where the source has none)."""

    q_rope: Tensor  # [n_heads, d_r, hidden]: each query head's kept pairs times its KV head's share of the key
    q_nope: Tensor  # [n_heads, d, hidden]: the source queries (turned by the phases when given)
    rope_key: Tensor  # [d_r, hidden]
    down: Tensor  # [kv_rank, hidden]: the latent
    kv_b: Tensor  # [n_heads, 2d, kv_rank]: per query head [k_nope; v] (its KV head's, copied)
    stats: InputMoments  # what the latent was weighed by (the calibration's for pca, the identity for svd)
    q_rope_bias: Tensor | None = None  # [n_heads, d_r]
    q_nope_bias: Tensor | None = None  # [n_heads, d]
    rope_bias: Tensor | None = None  # [d_r]
    down_bias: Tensor | None = None  # [kv_rank]


def shared_key_layer(w: AttentionWeights, *, kv_rank: int, pairs: Tensor, init: str = "svd",
                     moments: InputMoments | None = None, phases: Tensor | None = None) -> SharedKeyLayer:
    """The shared RoPE key of the source pairs PAIRS [n_keep] and a latent of kv_rank; phases: [n_heads,
    rotary_pairs] complex (AttentionPhaseCollector): every query pair's NoPE part turns by the source's mean
    rotation instead of losing its rotation outright."""
    s, d = w.shape, w.shape.head_dim
    check_rank(kv_rank, max_kv_rank(s, 2 * pairs.numel()))
    stats = input_moments(init, moments, s.hidden)
    u = principal_rotations(stats.of_linear(w.k, w.k_bias), s, pairs)[:, :, 0].float()  # [n_keep, n_kv]
    rope_key, k_nope = shared_rope_key(w.heads("k"), u, pairs, s.rotary_dim)  # [d_r, hidden], [n_kv, d, hidden]
    target = torch.cat([k_nope, w.heads("v")], dim=1).reshape(-1, s.hidden)  # [n_kv * 2d, hidden]
    rope_bias = target_bias = None
    if w.k_bias is not None or w.v_bias is not None:
        kb = w.head_bias("k") if w.k_bias is not None else torch.zeros(s.n_kv_heads, d)
        vb = w.head_bias("v") if w.v_bias is not None else torch.zeros(s.n_kv_heads, d)
        rope_bias, kb_nope = shared_rope_key(kb, u, pairs, s.rotary_dim)
        target_bias = torch.cat([kb_nope, vb], dim=1).flatten()
    k_rows = torch.zeros(s.n_kv_heads, 2 * d, dtype=torch.bool)
    k_rows[:, :d] = True
    low = joint_low_rank(None, kv_rank, k_rows.flatten(), balance=init == "pca",
                         factor=stats.factor_of_linear(target, target_bias))

    u_of_head = u.T[s.kv_head_of()]  # [n_heads, n_keep]: each query head's share of the shared key
    every_pair = torch.arange(s.rotary_pairs).expand(s.n_heads, -1)

    def nope(heads: Tensor) -> Tensor:
        return heads if phases is None else apply_phases(heads, phases, every_pair, s.rotary_dim)

    q_bias = w.head_bias("q")
    return SharedKeyLayer(
        q_rope=shared_rope_queries(w.heads("q"), u_of_head, pairs, s.rotary_dim), q_nope=nope(w.heads("q")),
        rope_key=rope_key, down=low.down @ target,
        kv_b=low.up.reshape(s.n_kv_heads, 2 * d, kv_rank)[s.kv_head_of()], stats=stats,
        q_rope_bias=None if q_bias is None else shared_rope_queries(q_bias, u_of_head, pairs, s.rotary_dim),
        q_nope_bias=None if q_bias is None else nope(q_bias), rope_bias=rope_bias,
        down_bias=None if target_bias is None else low.down @ target_bias)

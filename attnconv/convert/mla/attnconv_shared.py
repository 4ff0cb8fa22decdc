"""MHA/GQA -> MLA in attnconv's format with one RoPE key shared by all heads (`--rope-key shared`).

DeepSeek's structure without DeepSeek's latent norm: per layer one RoPE key of `rope_dim` dims for all heads (RoRoPE,
mla/rope.py: per kept pair, the principal axis of the keys across KV heads), and from one joint latent of `kv_rank`
dims every query head's full NoPE key (its KV head's key minus its share of the shared RoPE key) and its value.
Each query head reads its own rope_dim dims beside its head_dim NoPE dims (q_proj has head_dim + rope_dim rows per
head); the softmax scale stays the source's. kv_b_proj has one block per query head (GQA copies at conversion),
free to differ after uptraining, as DeepSeek's. A token's cache is kv_rank + rope_dim values.

Compared with the per-KV-head layout (attnconv_format.py), the key dims that lose their rotation stay in the NoPE
key instead of being cut from it, and the RoPE dims are paid once instead of per KV head: on SmolLM2 at MQA's cache
this is what beats the calibrated MQA (docs/benchmarks.md). With `phases` every query pair's NoPE part turns by the
source attention's mean rotation. Exact when the source's keys already share one RoPE key (an MQA source keeping
every pair) at kv_rank = max_kv_rank. Per-head q/k norms (Qwen3) need the per-KV-head layout; biases are kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnconv.convert.attention_weights import AttentionShape, AttentionWeights
from attnconv.convert.mla.calibration import InputMoments
from attnconv.convert.mla.deepseek import max_kv_rank
from attnconv.convert.mla.lowrank import check_rank, input_moments, joint_low_rank
from attnconv.convert.mla.rope import (
    apply_phases,
    principal_rotations,
    select_pairs,
    shared_rope_key,
    shared_rope_queries,
)
from attnconv.errors import AttnconvError

__all__ = ["max_kv_rank", "check_shared", "shared_pairs", "convert_shared_layer", "shared_output_shapes"]


def check_shared(qk_norm: bool) -> None:
    if qk_norm:
        raise AttnconvError("the source normalises each q/k head over its whole key (Qwen3's q_norm/k_norm), which a "
                            "RoPE key shared by all heads cannot hold; use --rope-key per-kv-head")


def shared_pairs(method: str, shape: AttentionShape, n_keep: int, scores: Tensor | None = None) -> Tensor:
    """The source pairs the shared RoPE key keeps, as the one row of rope_pairs: [1, n_keep] (2-norm: the pairs
    with the largest scores summed over the KV heads)."""
    if method == "2-norm" and scores is not None:
        scores = scores.sum(0, keepdim=True)  # [1, pairs]
    return select_pairs(method, shape, n_keep, scores)[:1]


def convert_shared_layer(w: AttentionWeights, *, kv_rank: int, pairs: Tensor, init: str = "svd",
                         moments: InputMoments | None = None, phases: Tensor | None = None) -> dict[str, Tensor]:
    """One layer with a shared RoPE key (names relative to `model.layers.N.self_attn.`).

    pairs: [n_keep] the source pairs the shared key keeps (shared_pairs' row; any set: the model rotates them at
    their own frequencies); moments: calibration moments of the layer's input (init="pca", and the RoRoPE axes);
    phases: [n_heads, rotary_pairs] complex (AttentionPhaseCollector).
    """
    s, d = w.shape, w.shape.head_dim
    check_shared(w.q_norm is not None or w.k_norm is not None)
    rope_dim = 2 * pairs.numel()
    check_rank(kv_rank, max_kv_rank(s, rope_dim))
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
    kv_b = low.up.reshape(s.n_kv_heads, 2 * d, kv_rank)[s.kv_head_of()]  # [n_heads, 2d, r]: GQA copies

    u_of_head = u.T[s.kv_head_of()]  # [n_heads, n_keep]: each query head's share of the shared key
    every_pair = torch.arange(s.rotary_pairs).expand(s.n_heads, -1)

    def query(heads: Tensor) -> Tensor:  # [n_heads, d, *rest] -> [n_heads, d_r + d, *rest]: [RoPE part; NoPE part]
        nope = heads if phases is None else apply_phases(heads, phases, every_pair, s.rotary_dim)
        return torch.cat([shared_rope_queries(heads, u_of_head, pairs, s.rotary_dim), nope], dim=1)

    out = {
        "q_proj.weight": query(w.heads("q")).reshape(-1, s.hidden),  # [n_heads * (d_r + d), hidden]
        "k_rope_proj.weight": rope_key,  # [d_r, hidden]
        "kv_a_proj.weight": low.down @ target,  # [kv_rank, hidden]
        "kv_b_proj.weight": kv_b.reshape(-1, kv_rank),  # [n_heads * 2d, kv_rank], per head [k_nope; v]
        "o_proj.weight": w.o,
    }
    if w.q_bias is not None:
        out["q_proj.bias"] = query(w.head_bias("q")).flatten()
    if target_bias is not None:
        out["k_rope_proj.bias"] = rope_bias
        out["kv_a_proj.bias"] = low.down @ target_bias
    if w.o_bias is not None:
        out["o_proj.bias"] = w.o_bias
    return out


def shared_output_shapes(shape: AttentionShape, *, kv_rank: int, rope_dim: int, q_bias: bool = False,
                         kv_bias: bool = False, o_bias: bool = False) -> dict[str, tuple]:
    """The shapes convert_shared_layer will produce, without computing anything (for a dry run's plan)."""
    s, d = shape, shape.head_dim
    out = {"q_proj.weight": (s.n_heads * (d + rope_dim), s.hidden), "k_rope_proj.weight": (rope_dim, s.hidden),
           "kv_a_proj.weight": (kv_rank, s.hidden), "kv_b_proj.weight": (s.n_heads * 2 * d, kv_rank),
           "o_proj.weight": (s.hidden, s.n_heads * d)}
    if q_bias:
        out["q_proj.bias"] = (s.n_heads * (d + rope_dim),)
    if kv_bias:
        out.update({"k_rope_proj.bias": (rope_dim,), "kv_a_proj.bias": (kv_rank,)})
    if o_bias:
        out["o_proj.bias"] = (s.hidden,)
    return out

"""MHA/GQA -> MLA in attnconv's format with one RoPE key shared by all heads (`--rope-key shared`).

DeepSeek's structure without DeepSeek's latent norm (the same layer as the deepseek-v3 format, mla/shared_key.py):
per layer one RoPE key of `rope_dim` dims for all heads (RoRoPE: per kept pair, the principal axis of the keys
across KV heads), and from one joint latent of `kv_rank` dims every query head's full NoPE key (its KV head's key
minus its share of the shared RoPE key) and its value.
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
from attnconv.convert.mla.rope import select_pairs
from attnconv.convert.mla.shared_key import max_kv_rank, shared_key_layer
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
    check_shared(w.q_norm is not None or w.k_norm is not None)
    layer = shared_key_layer(w, kv_rank=kv_rank, pairs=pairs, init=init, moments=moments, phases=phases)
    out = {
        # [n_heads * (d_r + d), hidden]: per head [RoPE part; NoPE part]
        "q_proj.weight": torch.cat([layer.q_rope, layer.q_nope], dim=1).reshape(-1, w.shape.hidden),
        "k_rope_proj.weight": layer.rope_key,  # [d_r, hidden]
        "kv_a_proj.weight": layer.down,  # [kv_rank, hidden]
        "kv_b_proj.weight": layer.kv_b.reshape(-1, kv_rank),  # [n_heads * 2d, kv_rank], per head [k_nope; v]
        "o_proj.weight": w.o,
    }
    if layer.q_nope_bias is not None:
        out["q_proj.bias"] = torch.cat([layer.q_rope_bias, layer.q_nope_bias], dim=1).flatten()
    if layer.down_bias is not None:
        out["k_rope_proj.bias"] = layer.rope_bias
        out["kv_a_proj.bias"] = layer.down_bias
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

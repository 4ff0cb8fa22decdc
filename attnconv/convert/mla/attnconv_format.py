"""MHA/GQA -> MLA in attnconv's own format: exact structure, lossless at full rank.

Per layer and KV head g the source key is split by dims: the kept RoPE pairs (`rope_dim` dims, chosen per head,
see mla/rope.py) stay a per-head RoPE key, cached; the other dims (NoPE keys) and the values of all KV heads come
from one joint latent of `kv_rank` dims (mla/lowrank.py), cached. Queries, the output projection, biases and
Qwen3's q/k norms are the source's. A token's cache is kv_rank + n_kv * rope_dim values (+ n_kv for families
with per-head k norms, whose per-token scale of the reconstructed key is cached too). With kv_rank =
n_kv * (2 head_dim - rope_dim) and any pairs the layer reproduces the source exactly.

Output tensor names are relative to the layer's attention module (`model.layers.N.self_attn.`); the model classes
are attnconv/models/mla.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnconv.convert.attention_weights import AttentionShape, AttentionWeights
from attnconv.convert.mla.calibration import InputMoments
from attnconv.convert.mla.lowrank import check_rank, input_moments, joint_low_rank
from attnconv.convert.mla.rope import apply_phases
from attnconv.errors import AttnconvError
from attnconv.families import FAMILIES, ROPE_FAMILIES, mla_architecture
from attnconv.models.mla_layout import nope_dims, rope_dims


def max_kv_rank(shape: AttentionShape, rope_dim: int) -> int:
    """The NoPE-key and value dims of all KV heads: the rank at which the latent is lossless."""
    return shape.n_kv_heads * (2 * shape.head_dim - rope_dim)


def cache_per_token(shape: AttentionShape, kv_rank: int, rope_dim: int, k_norm: bool = False) -> int:
    """Cached values per token and layer."""
    return kv_rank + shape.n_kv_heads * rope_dim + (shape.n_kv_heads if k_norm else 0)


def _gather_rows(heads: Tensor, dims: Tensor) -> Tensor:
    """heads [n_kv, head_dim, *rest], dims [n_kv, m] -> [n_kv, m, *rest]."""
    index = dims.reshape(*dims.shape, *([1] * (heads.dim() - 2))).expand(*dims.shape, *heads.shape[2:])
    return heads.gather(1, index)


def latent_target(w: AttentionWeights, pairs: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """What the latent must reconstruct: per KV head [k_nope (head_dim - rope_dim); v (head_dim)] stacked.

    -> weight [n_kv * (2 head_dim - rope_dim), hidden], bias [...] or None, key-row mask [...] bool
    """
    s = w.shape
    nope = nope_dims(rope_dims(pairs, s.rotary_dim), s.head_dim)  # [n_kv, d - d_r]
    weight = torch.cat([_gather_rows(w.heads("k"), nope), w.heads("v")], dim=1)  # [n_kv, 2d - d_r, hidden]
    k_rows = torch.zeros(weight.shape[:2], dtype=torch.bool)
    k_rows[:, : nope.shape[1]] = True
    bias = None
    if w.k_bias is not None or w.v_bias is not None:
        kb = w.head_bias("k") if w.k_bias is not None else torch.zeros(s.n_kv_heads, s.head_dim)
        vb = w.head_bias("v") if w.v_bias is not None else torch.zeros(s.n_kv_heads, s.head_dim)
        bias = torch.cat([_gather_rows(kb, nope), vb], dim=1).flatten()
    return weight.reshape(-1, s.hidden), bias, k_rows.flatten()


def dropped_pairs(pairs: Tensor, shape: AttentionShape) -> Tensor:
    """The RoPE pairs each query head loses: [n_heads, rotary_pairs - kept]."""
    keep = torch.zeros(pairs.shape[0], shape.rotary_pairs, dtype=torch.bool)
    keep.scatter_(1, pairs, True)
    dropped = torch.stack([(~row).nonzero().flatten() for row in keep])  # [n_kv, m]
    return dropped[shape.kv_head_of()]


def convert_attnconv_layer(w: AttentionWeights, *, kv_rank: int, pairs: Tensor, init: str = "svd",
                           moments: InputMoments | None = None, phases: Tensor | None = None) -> dict[str, Tensor]:
    """One layer in attnconv's MLA format.

    pairs: [n_kv, rope_dim / 2] kept RoPE pairs per KV head (mla_rope.select_pairs); moments: calibration
    moments of the layer's input (required for init="pca"); phases: [n_heads, rotary_pairs] complex, the
    source's mean rotation per pair (AttentionPhaseCollector): the dropped pairs of each query are rotated and
    scaled by it instead of losing their rotation outright (ignored for families with q norms, where the
    query weights feed a norm first).
    """
    s = w.shape
    rope_dim = 2 * pairs.shape[1]
    if pairs.shape[0] != s.n_kv_heads:
        raise ValueError(f"pairs has {pairs.shape[0]} rows for {s.n_kv_heads} KV heads")
    check_rank(kv_rank, max_kv_rank(s, rope_dim))
    stats = input_moments(init, moments, s.hidden)
    target, target_bias, k_rows = latent_target(w, pairs)
    low = joint_low_rank(None, kv_rank, k_rows, balance=init == "pca",
                         factor=stats.factor_of_linear(target, target_bias))
    rope = rope_dims(pairs, s.rotary_dim)
    q, q_bias = w.q, w.q_bias
    if phases is not None and w.q_norm is None and pairs.shape[1] < s.rotary_pairs:
        lost = dropped_pairs(pairs, s)
        q = apply_phases(w.heads("q"), phases, lost, s.rotary_dim).reshape_as(w.q)
        if q_bias is not None:
            q_bias = apply_phases(w.head_bias("q"), phases, lost, s.rotary_dim).flatten()
    out = {
        "q_proj.weight": q,
        "k_rope_proj.weight": _gather_rows(w.heads("k"), rope).reshape(-1, s.hidden),  # [n_kv * d_r, hidden]
        "kv_a_proj.weight": low.down @ target,  # [kv_rank, hidden]
        "kv_b_proj.weight": low.up,  # [n_kv * (2d - d_r), kv_rank]
        "o_proj.weight": w.o,
    }
    if q_bias is not None:
        out["q_proj.bias"] = q_bias
    if target_bias is not None:
        kb = w.head_bias("k") if w.k_bias is not None else torch.zeros(s.n_kv_heads, s.head_dim)
        out["k_rope_proj.bias"] = _gather_rows(kb, rope).flatten()
        out["kv_a_proj.bias"] = low.down @ target_bias
    if w.o_bias is not None:
        out["o_proj.bias"] = w.o_bias
    if w.q_norm is not None:
        out["q_norm.weight"] = w.q_norm
    if w.k_norm is not None:
        out["k_norm.weight"] = w.k_norm
    return out


def attnconv_output_shapes(shape: AttentionShape, *, kv_rank: int, rope_dim: int, q_bias: bool = False,
                           kv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False) -> dict[str, tuple]:
    """The shapes convert_attnconv_layer will produce, without computing anything (for a dry run's plan)."""
    s = shape
    out = {"q_proj.weight": (s.n_heads * s.head_dim, s.hidden),
           "k_rope_proj.weight": (s.n_kv_heads * rope_dim, s.hidden), "kv_a_proj.weight": (kv_rank, s.hidden),
           "kv_b_proj.weight": (max_kv_rank(s, rope_dim), kv_rank),
           "o_proj.weight": (s.hidden, s.n_heads * s.head_dim)}
    if q_bias:
        out["q_proj.bias"] = (s.n_heads * s.head_dim,)
    if kv_bias:
        out.update({"k_rope_proj.bias": (s.n_kv_heads * rope_dim,), "kv_a_proj.bias": (kv_rank,)})
    if o_bias:
        out["o_proj.bias"] = (s.hidden,)
    if qk_norm:
        out.update({"q_norm.weight": (s.head_dim,), "k_norm.weight": (s.head_dim,)})
    return out


def attnconv_config(source_config: dict, *, kv_ranks: list[int], rope_dim: int, pairs: list[Tensor],
                    init: str, rope_key: str = "per-kv-head") -> dict:
    """config.json of the attnconv-format output: the source's, with the MLA model type and the MLA fields.

    kv_ranks: one rank per layer (all equal is written as one int); pairs: per layer [n_kv, rope_dim / 2], or
    [1, rope_dim / 2] with rope_key "shared" (attnconv_shared.py), whose latent has one block per query head
    (num_key_value_heads = the query heads). Adds kv_lora_rank, qk_rope_dim, rope_pairs, rope_key, mla_init and
    kv_cache_dim_per_layer.
    """
    model_type = source_config.get("model_type")
    if model_type not in ROPE_FAMILIES:
        raise AttnconvError(f"--to mla supports {', '.join(ROPE_FAMILIES)}, not model_type {model_type!r}")
    out = dict(source_config)
    out["model_type"], arch = mla_architecture(model_type)
    out["architectures"] = [arch]
    out["kv_lora_rank"] = kv_ranks[0] if len(set(kv_ranks)) == 1 else list(kv_ranks)
    out["qk_rope_dim"] = rope_dim
    out["rope_pairs"] = [p.tolist() for p in pairs]
    out["mla_init"] = init
    out["rope_key"] = rope_key
    # what attnconv.families.cache_shape reads: cached values per token and layer (mean over layers if ranks differ)
    n_kv = source_config.get("num_key_value_heads") or source_config["num_attention_heads"]
    if rope_key == "shared":
        out["num_key_value_heads"], n_kv = source_config["num_attention_heads"], 1  # latent blocks; one RoPE key
    dims = [r + n_kv * rope_dim + (n_kv if FAMILIES[model_type].qk_norm else 0) for r in kv_ranks]
    out["kv_cache_dim_per_layer"] = dims[0] if len(set(dims)) == 1 else sum(dims) / len(dims)
    return out

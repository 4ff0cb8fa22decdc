"""Multi-head latent attention (MLA) for a one-token decode step, in the absorbed form, over a latent cache.

The cache keeps one row per token, shared by every head: `[c; k_rot]`, the latent c ([r], after the model's
latent norm) and the rotated RoPE key ([d_r]). kv_b_proj expands c into per-head keys and values, split per head
into W_uk [H, d_nope, r] and W_uv [H, d_v, r]. Instead of expanding every cached row at every step (what
transformers' DeepseekV3 does), the step moves the query into the latent space once:

    q_abs  = q_nope @ W_uk                                        [b, H, r]
    scores = (q_abs . c_j + q_rot . k_rot_j) * scale              [b, H, L]
    out    = (softmax(scores) @ c) @ W_uv^T                       [b, H, d_v]

so the step reads r + d_r values per cached token, once for all heads, but does H x (2r + d_r) multiply-adds per
token: ~5 per byte, compute-bound on a CPU. The scores are a dot product of the row `[q_abs; q_rot]` with the
cache row. On CPU in float32, `cpu_mla.c` does scores, softmax and values in one pass per chunk of keys while the
chunk is in cache (with AVX2 1.6-1.75x the separate passes below, with AVX-512 another 1.3-1.45x; one thread on
this project's EPYC); without it, the scores are the grouped-heads case of attnconv's `decode_scores` (one KV head,
g = H, d = r + d_r), then torch's softmax and BLAS over the first r columns of the same rows. Elsewhere torch does
it (SDPA over the latent, the H heads folded into the query axis).

For layouts whose RoPE keys are per KV head rather than shared, the two score terms are apart: `latent_scores`
over the shared latent and `grouped_rope_scores` per KV head add up to the same scores, and `latent_attention`
takes the RoPE term as `extra` scores over rows that hold the latent alone. `grouped_mla_decode_attention` is the
whole step for such a layout (attnconv's MLA format: per-KV-head up-projections and RoPE keys, optionally a cached
per-token factor on the NoPE keys). No transformers imports here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnconv.kernels import cpu_decode, cpu_mla


def split_kv_b(weight: torch.Tensor, n_heads: int, nope_dim: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj's weight [H * (d_nope + d_v), r] -> views W_uk [H, d_nope, r] and W_uv [H, d_v, r]."""
    per_head = weight.view(n_heads, nope_dim + v_dim, weight.shape[-1])  # [H, d_nope + d_v, r]
    return per_head[:, :nope_dim], per_head[:, nope_dim:]


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [b, H, d_nope] @ W_uk [H, d_nope, r] -> q_abs [b, H, r]: the query in latent space."""
    return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [H, b, r] -> [b, H, r]


def unabsorb_output(out_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """out_latent [b, H, r] @ W_uv^T ([H, r, d_v]) -> per-head outputs [b, H, d_v]."""
    return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [H, b, d_v] -> [b, H, d_v]


def _native(*tensors: torch.Tensor, backend: str) -> bool:
    """Whether attnconv's CPU scores kernel takes these tensors (float32 CPU rows of a multiple of 8 values)."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and tensors[-1].shape[-1] % 8 == 0 and tensors[-1].stride(-1) == 1
            and cpu_decode.resolve_backend(backend) == "native")


def latent_scores(query: torch.Tensor, keys: torch.Tensor, scale: float, backend: str = "auto") -> torch.Tensor:
    """scale * query [b, H, d] . keys [b, L, d] (one key row per token, shared by all H heads) -> [b, H, L], fp32.

    keys may be a strided view (e.g. the first d columns of the cache rows) with stride 1 along d."""
    if _native(query, keys, backend=backend):
        return cpu_decode.decode_scores(query[:, None], keys[:, None], scale)[:, 0]  # n_kv = 1, g = H
    return torch.matmul(query, keys.transpose(-1, -2)).float().mul_(scale)


def grouped_rope_scores(q_rot: torch.Tensor, k_rot: torch.Tensor, scale: float, backend: str = "auto") -> torch.Tensor:
    """scale * q_rot [b, n_kv, g, d_r] . k_rot [b, n_kv, L, d_r] -> [b, n_kv * g, L], fp32: the RoPE term for
    RoPE keys kept per KV head (add it to `latent_scores` of the latent alone)."""
    b, n_kv, g, _ = q_rot.shape
    if _native(q_rot, k_rot, backend=backend):
        scores = cpu_decode.decode_scores(q_rot, k_rot, scale)
    else:
        scores = torch.matmul(q_rot, k_rot.transpose(-1, -2)).float().mul_(scale)
    return scores.reshape(b, n_kv * g, -1)


def latent_values(probs: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """probs [b, H, L] @ latent [b, L, r] (a strided view of the cache rows) -> [b, H, r]."""
    return torch.matmul(probs.to(latent.dtype), latent)


def latent_attention(query: torch.Tensor, rows: torch.Tensor, rank: int, scale: float,
                     keep: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """softmax(query [b, H, D] . rows [b, L, D] * scale (+ extra [b, H, L]), keep [b, L]) @ rows[..., :rank]
    -> [b, H, rank], for rows shared by all H heads. `extra`: scores computed apart (e.g. `grouped_rope_scores`)."""
    latent = rows[..., :rank]  # [b, L, r]
    if not (rows.device.type == "cpu" and rows.dtype == torch.float32):
        # SDPA's kernels, the H heads folded into the query axis of one shared "KV head"
        mask = None if keep is None else keep[:, None, None, :]  # [b, 1, 1, L]
        if extra is not None:  # an additive mask: the extra scores, -inf where masked
            bias = extra[:, None].to(query.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(query[:, None], rows[:, None], latent[:, None], attn_mask=mask,
                                              scale=scale)[:, 0]  # [b, H, r]
    native = cpu_decode.resolve_backend(backend) == "native"
    if native and cpu_mla.available() and cpu_mla.supports(query, rows, rank):  # one pass over the rows
        return cpu_mla.latent_attention(query, rows, rank, scale, keep, extra)
    scores = latent_scores(query, rows, scale, backend)  # [b, H, L]
    if extra is not None:
        scores += extra
    if keep is not None:
        scores.masked_fill_(~keep[:, None, :], float("-inf"))
    return latent_values(scores.softmax(-1), latent)


def mla_decode_attention(q_nope: torch.Tensor, q_rot: torch.Tensor, rows: torch.Tensor, w_uk: torch.Tensor,
                         w_uv: torch.Tensor, scale: float, keep: torch.Tensor | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """Absorbed MLA for one new token per sequence.

    q_nope [b, H, d_nope], q_rot [b, H, d_r] (rotated); rows [b, L, r + d_r] = [latent; rotated RoPE key] per
    cached token (this step's included; a view of the filled cache, stride 1 on the last axis); W_uk [H, d_nope, r],
    W_uv [H, d_v, r]; keep: None or a boolean [b, L] (False: a padding token no query may see).
    backend: attnconv's CPU kernels ("auto", "native") or torch ("torch"). Returns [b, H, d_v].
    """
    rank = w_uk.shape[-1]
    query = torch.cat([absorb_query(q_nope, w_uk), q_rot.to(w_uk.dtype)], dim=-1)  # [b, H, r + d_r]
    out_latent = latent_attention(query, rows, rank, scale, keep, backend=backend)  # [b, H, r]
    return unabsorb_output(out_latent.to(w_uv.dtype), w_uv)


def mla_decode_reference(q_nope: torch.Tensor, q_rot: torch.Tensor, rows: torch.Tensor, w_uk: torch.Tensor,
                         w_uv: torch.Tensor, scale: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """`mla_decode_attention` as plain torch math in the inputs' dtype (float64 for references); [b, H, d_v]."""
    rank = w_uk.shape[-1]
    latent, k_rot = rows[..., :rank], rows[..., rank:]  # [b, L, r], [b, L, d_r]
    q_abs = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)
    scores = (torch.einsum("bhr,blr->bhl", q_abs, latent) + torch.einsum("bhd,bld->bhl", q_rot, k_rot)) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, :], float("-inf"))
    out_latent = torch.einsum("bhl,blr->bhr", scores.softmax(-1), latent)
    return torch.einsum("bhr,hvr->bhv", out_latent, w_uv)


def expand_latent(latent: torch.Tensor, k_rot: torch.Tensor, kv_b_weight: torch.Tensor, n_heads: int,
                  nope_dim: int, v_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unabsorbed form, for prefill: latent [b, L, r] and k_rot [b, L, d_r] -> per-head keys
    [b, H, L, d_nope + d_r] (the RoPE key repeated for every head) and values [b, H, L, d_v]."""
    b, length, _ = latent.shape
    kv = F.linear(latent, kv_b_weight).view(b, length, n_heads, nope_dim + v_dim).transpose(1, 2)
    k_nope, values = kv.split([nope_dim, v_dim], dim=-1)  # [b, H, L, d_nope], [b, H, L, d_v]
    keys = torch.cat([k_nope, k_rot[:, None].expand(b, n_heads, length, k_rot.shape[-1])], dim=-1)
    return keys, values


def grouped_mla_decode_attention(q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor,
                                 k_rot: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float,
                                 keep: torch.Tensor | None = None, key_scale: torch.Tensor | None = None,
                                 backend: str = "auto") -> torch.Tensor:
    """Absorbed MLA for one new token per sequence where the latent is shared but keys come per KV head: each
    KV head g has its own up-projections and its own rotated RoPE key (attnconv's MLA format).

    q_nope [b, n_kv, g, d_nope] and q_rot [b, n_kv, g, d_r] (rotated): the g query heads of each KV head;
    latent [b, L, r] (a view of the cache rows, stride 1 along r); k_rot [b, n_kv, L, d_r]; W_uk [n_kv, d_nope, r],
    W_uv [n_kv, d_v, r]; keep: None or boolean [b, L]; key_scale: None or [b, L, n_kv], a factor on each cached
    NoPE key (Qwen3's per-head 1/rms): the NoPE score is linear in the key, so it scales the score instead.
    Returns [b, n_kv, g, d_v].
    """
    b, n_kv, g, _ = q_nope.shape
    heads, rank, length = n_kv * g, w_uk.shape[-1], latent.shape[1]
    q_abs = torch.matmul(q_nope.to(w_uk.dtype), w_uk[None]).reshape(b, heads, rank)  # [b, H, r]
    rope = grouped_rope_scores(q_rot.to(k_rot.dtype), k_rot, scale, backend)  # [b, H, L]
    if key_scale is None:  # the RoPE term as extra scores: one fused pass over the latent rows where it can
        out = latent_attention(q_abs, latent, rank, scale, keep, extra=rope, backend=backend)  # [b, H, r]
    else:
        scores = latent_scores(q_abs, latent, scale, backend).view(b, n_kv, g, length)
        scores.mul_(key_scale.transpose(1, 2)[:, :, None].float())  # [b, n_kv, 1, L]
        scores = scores.view(b, heads, length) + rope
        if keep is not None:
            scores.masked_fill_(~keep[:, None, :], float("-inf"))
        out = latent_values(scores.softmax(-1), latent)
    out = out.to(w_uv.dtype).view(b, n_kv, g, rank)
    return torch.matmul(out, w_uv.transpose(1, 2)[None])  # [b, n_kv, g, d_v]


def grouped_mla_decode_reference(q_nope: torch.Tensor, q_rot: torch.Tensor, latent: torch.Tensor,
                                 k_rot: torch.Tensor, w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float,
                                 keep: torch.Tensor | None = None,
                                 key_scale: torch.Tensor | None = None) -> torch.Tensor:
    """`grouped_mla_decode_attention` unabsorbed, as plain torch math: NoPE keys and values expanded per KV head
    from the latent, keys [k_nope * key_scale; k_rot], softmax attention; [b, n_kv, g, d_v]."""
    k_nope = torch.einsum("knr,blr->bkln", w_uk, latent)  # [b, n_kv, L, d_nope]
    if key_scale is not None:
        k_nope = k_nope * key_scale.transpose(1, 2)[..., None]
    values = torch.einsum("kvr,blr->bklv", w_uv, latent)  # [b, n_kv, L, d_v]
    scores = (torch.einsum("bkgn,bkln->bkgl", q_nope, k_nope) + torch.einsum("bkgd,bkld->bkgl", q_rot, k_rot)) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bkgl,bklv->bkgv", scores.softmax(-1), values)

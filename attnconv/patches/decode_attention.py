"""The attention of attnconv's decode loop: SDPA over the filled part of the preallocated cache.

Attention runs over the filled prefix only, so no mask is built: prefill from position 0 is plain causal (SDPA,
`enable_gqa=True`), and a one-token decode step attends to all it has, with the query heads of each KV group folded
together so K/V are read once per group and never repeated. Registered as "attnconv_decode" while a decode runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from attnconv.patches.attention import attention_implementation

NAME = "attnconv_decode"


def _window_mask(q_len: int, k_len: int, window: int | None, device) -> torch.Tensor:
    """Boolean [q, k] mask: causal for queries at the end of the keys, and within `window` when given."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window  # transformers' sliding_window_overlay
    return allowed


def _decode_attention(query, key, value, mask, scale: float) -> torch.Tensor:
    """softmax(q K^T * scale) V for a one-token step; query [b, n_kv, g, d], key/value [b, n_kv, k, d] views of
    the CPU cache (value transposed: stride 1 along k; key transposed too, or rows that attnconv's scores kernel
    reads), mask None or keep-mask [b, 1, 1, k]. Returns [b, n_kv, g, d]."""
    if key.stride(-1) == 1:  # keys kept as rows for the native kernel (PreallocatedLayer keys_as_rows)
        from attnconv.kernels.cpu_decode import decode_scores

        scores = decode_scores(query, key, scale)  # [b, n_kv, g, k]
    else:
        scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)  # [b, n_kv, g, k]
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1).to(value.dtype), value)


def sdpa_gqa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       sliding_window=None, **kwargs):
    """Attention over the filled cache with SDPA and enable_gqa=True; returns ([b, s, h, d], None).

    query: [b, h, s, d]; key/value: [b, n_kv, k, d] with k = tokens seen so far (this step's included).
    attention_mask: None (same-length prompts: no mask at all), or a boolean keep-mask [b, 1, s, >= k] from
    `greedy_generate` for padded prompts; causality and the sliding window are added here.
    """
    b, h, q_len, d = query.shape
    n_kv, k_len = key.shape[1], key.shape[2]
    mask = None if attention_mask is None else attention_mask[..., :k_len]
    windowed = sliding_window is not None and k_len > sliding_window
    if q_len == 1:
        if windowed:  # exactly the last `sliding_window` keys, by slicing rather than masking
            key, value = key[:, :, -sliding_window:], value[:, :, -sliding_window:]
            mask = None if mask is None else mask[..., -sliding_window:]
        # One new token sees every cached one. Fold the query heads of each KV group into the query-length axis
        # ([b, h, 1, d] -> [b, n_kv, g, d]) so each K/V head is read once for its whole group.
        grouped = query.reshape(b, n_kv, h // n_kv, d)
        if value.stride(-1) != 1:  # the CPU cache's transposed buffers: two products over contiguous rows
            out = _decode_attention(grouped, key, value, mask, d ** -0.5 if scaling is None else scaling)
        else:
            out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scaling,
                                                 enable_gqa=True)  # [b, n_kv, g, d]
        return out.reshape(b, 1, h, value.shape[-1]), None
    key, value = key.contiguous(), value.contiguous()  # a no-op but for a CPU cache's views (chunked prefill)
    d_v = value.shape[-1]
    if d_v < d:  # MLA's narrower values: SDPA's fused kernels need one head size, else [b, h, s, k] scores in memory
        value = F.pad(value, (0, d - d_v))
    if mask is None and q_len == k_len and not windowed:  # prefill from position 0: plain causal
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    else:  # padding, chunked prefill, or a prompt longer than the window: one mask for the whole call
        band = _window_mask(q_len, k_len, sliding_window if windowed else None, query.device)  # [s, k]
        mask = band if mask is None else mask & band
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out[..., :d_v].transpose(1, 2), None  # [b, s, h, d_v]


@contextmanager
def decode_attention(model) -> Iterator[bool]:
    """Run MODEL's attention through `sdpa_gqa_attention` within this block (registered as "attnconv_decode")."""
    with attention_implementation(model, NAME, sdpa_gqa_attention) as switched:
        yield switched

"""A KV cache preallocated once per run, and the SDPA attention function that reads only its filled part.

The cache plugs into transformers' own modules (`Cache` of `CacheLayerMixin`s), so embeddings, norms, MLPs and
rotary embeddings stay the model's own; only the caching and the attention call are attnconv's:
- K/V live in one buffer per layer, written in place (no torch.cat, no regrowth), and are never repeated across
  query heads. On CPU the buffers are stored transposed, `[b, n_kv, head_dim, max_len]`: a decode step's two
  products (q @ K^T, p @ V) then read long contiguous rows, 1.4x faster than SDPA's kernel over `[.., max_len,
  head_dim]` (17 vs 12 GB/s at batch 8, 2k tokens, 12 heads). Where 2+ query heads share a KV head and
  attnconv's CPU kernels load, keys stay rows (`keys_as_rows`) for its grouped scores kernel (BLAS runs those
  few-row products at 4-7 GB/s); on GPUs the usual layout feeds SDPA's kernels;
- attention runs over the filled prefix only, so no mask is built: prefill from position 0 is plain causal
  (SDPA, `enable_gqa=True`), and a one-token decode step attends to all it has.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from attnconv.kv import cache_shape

ATTN_IMPLEMENTATION = "attnconv_sdpa"


class PreallocatedLayer(CacheLayerMixin):
    """One layer's K and V, allocated for the whole run; `update` writes in place and returns the filled views."""

    is_sliding = False

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device,
                 keys_as_rows: bool = False):
        super().__init__()
        self.max_len = max_len
        self.transposed = torch.device(device).type == "cpu"  # values (and keys, unless keys_as_rows) on CPU
        self.keys_transposed = self.transposed and not keys_as_rows
        rows, columns = (batch, n_kv_heads, max_len, head_dim), (batch, n_kv_heads, head_dim, max_len)
        self.keys = torch.zeros(columns if self.keys_transposed else rows, dtype=dtype, device=device)
        self.values = torch.zeros(columns if self.transposed else rows, dtype=dtype, device=device)
        self.length = 0  # a Python int: slicing with it costs no device sync
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front instead
        return None

    def filled(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first `end` positions as [b, n_kv, end, d] (transposed strides on CPU)."""
        keys = self.keys[..., :end].transpose(-1, -2) if self.keys_transposed else self.keys[:, :, :end]
        values = self.values[..., :end].transpose(-1, -2) if self.transposed else self.values[:, :, :end]
        return keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states/value_states: [b, n_kv, s_new, d]
        start, end = self.length, self.length + key_states.shape[-2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} tokens > {self.max_len} preallocated")
        keys, values = self.filled(end)
        keys[:, :, start:end].copy_(key_states)
        values[:, :, start:end].copy_(value_states)
        self.length = end
        if start == 0:  # a prefill from empty attends to exactly these, in the layout SDPA's kernels want
            return key_states, value_states
        return keys, values  # [b, n_kv, end, d], views into the buffers

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def reset(self) -> None:
        self.length = 0


class PreallocatedKVCache(Cache):
    """A `transformers.Cache` whose layers are `PreallocatedLayer`s sized for `batch x max_len` tokens."""

    def __init__(self, config, batch: int, max_len: int, dtype: torch.dtype, device, keys_as_rows: bool = False):
        shape = cache_shape(config)
        super().__init__(layers=[
            PreallocatedLayer(batch, shape.n_kv_heads, max_len, shape.head_dim, dtype, device, keys_as_rows)
            for _ in range(shape.layers)
        ])

    @property
    def nbytes(self) -> int:
        """What the cache tensors really hold, for comparison with `attnconv.kv` arithmetic."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)


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
        return out.reshape(b, 1, h, d), None
    key, value = key.contiguous(), value.contiguous()  # a no-op but for a CPU cache's views (chunked prefill)
    if mask is None and q_len == k_len and not windowed:  # prefill from position 0: plain causal
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    else:  # padding, chunked prefill, or a prompt longer than the window: one mask for the whole call
        band = _window_mask(q_len, k_len, sliding_window if windowed else None, query.device)  # [s, k]
        mask = band if mask is None else mask & band
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None  # [b, s, h, d]


AttentionInterface.register(ATTN_IMPLEMENTATION, sdpa_gqa_attention)


@contextmanager
def attnconv_attention(model):
    """Run MODEL's attention through `sdpa_gqa_attention`, restoring its own implementation afterwards."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)

"""A KV cache preallocated once per run, for attnconv's decode loop.

It plugs into transformers' own modules (`Cache` of `CacheLayerMixin`s), so embeddings, norms, MLPs and rotary
embeddings stay the model's own. K/V live in one buffer per layer, written in place (no torch.cat, no regrowth),
and are never repeated across query heads. On CPU the buffers are stored transposed, `[b, n_kv, head_dim,
max_len]`: a decode step's two products (q @ K^T, p @ V) then read long contiguous rows. Where 2+ query heads share
a KV head and attnconv's CPU kernels load, keys stay rows (`keys_as_rows`) for its grouped scores kernel; on GPUs
the usual layout feeds SDPA's kernels. MLA models (DeepseekV3) cache one row per token instead, `[latent;
rotated RoPE key]`, shared by every head (`LatentKVCache`, used by patches/deepseek_v3.py). Measurements:
docs/benchmarks.md.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from attnconv.families import cache_shape


class GrowingLayer(CacheLayerMixin):
    """A cache layer allocated for max_len tokens, filled from the start: `length` tokens are in."""

    is_sliding = False
    length = 0  # a Python int: slicing with it costs no device sync
    max_len = 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def reset(self) -> None:
        self.length = 0


class PreallocatedLayer(GrowingLayer):
    """One layer's K and V, allocated for the whole run; `update` writes in place and returns the filled views."""

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
        """What the cache tensors really hold, for comparison with `attnconv.families.cache_shape` arithmetic."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers)


class LatentLayer(GrowingLayer):
    """One MLA layer's cache: a row `[latent; rotated RoPE key]` per token, [b, max_len, r + d_r], shared by every
    head and allocated for the whole run. `keys`/`values` are views of its two parts as transformers' DeepseekV3
    caches them ([b, 1, max_len, r] and [b, 1, max_len, d_r]), so its own forward can use this cache too."""

    def __init__(self, batch: int, max_len: int, rank: int, rope_dim: int, dtype, device):
        super().__init__()
        self.max_len, self.rank = max_len, rank
        self.rows = torch.zeros(batch, max_len, rank + rope_dim, dtype=dtype, device=device)
        self.keys = self.rows[:, None, :, :rank]
        self.values = self.rows[:, None, :, rank:]
        self.length = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front instead
        return None

    def append(self, latent: torch.Tensor, k_rot: torch.Tensor) -> torch.Tensor:
        """Write latent [b, s, r] and k_rot [b, s, d_r] after the filled rows; the filled rows [b, end, r + d_r]."""
        start, end = self.length, self.length + latent.shape[1]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} tokens > {self.max_len} preallocated")
        self.rows[:, start:end, :self.rank].copy_(latent)
        self.rows[:, start:end, self.rank:].copy_(k_rot)
        self.length = end
        return self.rows[:, :end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # transformers' DeepseekV3 passes the latent [b, 1, s, r] as keys and the RoPE key [b, 1, s, d_r] as values
        rows = self.append(key_states[:, 0], value_states[:, 0])
        return rows[:, None, :, :self.rank], rows[:, None, :, self.rank:]



class LatentKVCache(Cache):
    """A `transformers.Cache` of `LatentLayer`s for MLA models (kv_lora_rank r, qk_rope_head_dim d_r)."""

    def __init__(self, config, batch: int, max_len: int, dtype: torch.dtype, device):
        super().__init__(layers=[
            LatentLayer(batch, max_len, config.kv_lora_rank, config.qk_rope_head_dim, dtype, device)
            for _ in range(config.num_hidden_layers)
        ])

    @property
    def nbytes(self) -> int:
        """What the cache tensors really hold: r + d_r values per token and layer."""
        return sum(layer.rows.nbytes for layer in self.layers)

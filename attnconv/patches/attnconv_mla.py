"""attnconv's own MLA format (models/mla.py, `MLAAttention`) in attnconv's decode loop: latent cache, absorbed steps.

`MLAAttention` caches per-KV-head rotated RoPE keys and one joint latent per token (for Qwen3 followed by each KV
head's 1/rms of its reconstructed key), and rebuilds NoPE keys and values from every cached latent at every step.
Within `attnconv_mla_decode(model)` each attention layer's forward is replaced (on the module instance; the class
is untouched), given a `RopeLatentKVCache`:
- prefill (several tokens): the model's own forward, unabsorbed, over the filled cache, with attnconv's decode
  attention (`sdpa_gqa_attention`: causality, the loop's padding keep-mask, sliding windows);
- one-token steps: the absorbed form (kernels/mla_attention.py `grouped_mla_decode_attention`): each query head's
  NoPE part moves into latent space through its KV head's key up-projection, values are read in latent space and
  up-projected after attention, the RoPE term comes per KV head as extra scores. Qwen3's k norm: its weight on
  the NoPE dims folds into the query, its 1/rms (cached) scales the NoPE scores (the score is linear in the key).
  With one shared RoPE key (rope_key "shared") the cache rows are [latent; RoPE key], as DeepSeek's, and the step
  is DeepSeek's (`mla_decode_attention`): one fused pass over the rows.
  Sliding windows: the step reads the last `sliding_window` cached tokens, as transformers' sliding mask does.
The attention is registered as "attnconv_mla_fmt_decode" (the same function as "attnconv_decode") in the block and
the model's own implementation comes back after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache

from attnconv.errors import AttnconvError
from attnconv.kernels.mla_attention import grouped_mla_decode_attention, mla_decode_attention, split_kv_b
from attnconv.patches.attention import attention_implementation, instance_forwards
from attnconv.patches.decode_attention import sdpa_gqa_attention
from attnconv.patches.decode_cache import GrowingLayer

NAME = "attnconv_mla_fmt_decode"


class RopeLatentLayer(GrowingLayer):
    """One layer's cache, allocated for the whole run: rotated RoPE keys [b, n_rope, max_len, d_r] (per KV head,
    or one shared by all) (`keys`) and latent rows [b, max_len, r (+ n_kv)] (`rows`; `values` is the
    [b, 1, max_len, ...] view `MLAAttention` caches), so the model's own forward can use it too.
    `joint` (one shared RoPE key): each row is [latent; RoPE key], as DeepSeek's cache, and `keys` a view of the
    rows' last d_r columns, so an absorbed step reads one row per token in one fused pass."""

    def __init__(self, batch: int, max_len: int, n_rope: int, rope_dim: int, latent_dim: int, dtype, device,
                 joint: bool = False):
        super().__init__()
        self.max_len, self.joint, self.latent_dim = max_len, joint, latent_dim
        if joint:
            self.rows = torch.zeros(batch, max_len, latent_dim + rope_dim, dtype=dtype, device=device)
            self.keys = self.rows[:, None, :, latent_dim:]  # [b, 1, max_len, d_r], a view
        else:
            self.keys = torch.zeros(batch, n_rope, max_len, rope_dim, dtype=dtype, device=device)
            self.rows = torch.zeros(batch, max_len, latent_dim, dtype=dtype, device=device)
        self.values = self.rows[:, None, :, :latent_dim]
        self.length = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated up front instead
        return None

    def append(self, k_rope: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k_rope [b, n_rope, s, d_r] and latent [b, 1, s, r (+ n_kv)] after the filled tokens; the filled
        RoPE keys [b, n_rope, end, d_r] and latent rows [b, end, r (+ n_kv); joint: r + d_r], this call's tokens
        included."""
        start, end = self.length, self.length + k_rope.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} tokens > {self.max_len} preallocated")
        self.keys[:, :, start:end].copy_(k_rope)
        self.rows[:, start:end, :self.latent_dim].copy_(latent[:, 0])
        self.length = end
        return self.keys[:, :, :end], self.rows[:, :end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.length
        keys, rows = self.append(key_states, value_states)
        if start == 0:  # a prefill from empty attends to exactly these, contiguous
            return key_states, value_states
        return keys, rows[:, None, :, :self.latent_dim]



def mla_modules(model) -> list:
    """MODEL's attnconv-format MLA attention layers, in order."""
    from attnconv.models.mla import MLAAttention

    return [m for m in model.modules() if isinstance(m, MLAAttention)]


class RopeLatentKVCache(Cache):
    """A `transformers.Cache` of `RopeLatentLayer`s sized for `batch x max_len` tokens of MODEL's MLA layers (their
    ranks may differ per layer)."""

    def __init__(self, model, batch: int, max_len: int, dtype: torch.dtype, device):
        super().__init__(layers=[
            RopeLatentLayer(batch, max_len, m.n_rope, m.qk_rope_dim, m.cache_latent_dim, dtype, device,
                            joint=m.shared_rope)
            for m in mla_modules(model)
        ])

    @property
    def nbytes(self) -> int:
        """What the cache tensors really hold: r (+ n_kv) + n_rope x d_r values per token and layer."""
        return sum(layer.rows.nbytes + (0 if layer.joint else layer.keys.nbytes) for layer in self.layers)


def unsupported_reason(model) -> str | None:
    """Why the absorbed decode cannot run MODEL exactly, or None when it can."""
    modules = mla_modules(model)
    if not modules:
        return "the model has no attnconv MLA attention layers (MLAAttention); load it with attnconv"
    if getattr(model.config, "kv_cache_dim_per_layer", None) is None:
        return ("the attnconv MLA config has no kv_cache_dim_per_layer (the cache size per token); "
                "re-convert it with this version of attnconv")
    if any(m.kv_b_proj.bias is not None for m in modules):  # the absorbed form moves kv_b_proj into the query
        return "kv_b_proj has a bias, which the absorbed attention does not fold; remove it or re-convert"
    return None


def _step(module, hidden_states, position_embeddings, attention_mask, layer: RopeLatentLayer, backend: str):
    """One new token per sequence, absorbed: [b, 1, hidden] -> the attention output [b, 1, hidden]."""
    b = hidden_states.shape[0]
    n_kv, heads, d, d_r, rank = module.n_kv, module.n_heads, module.head_dim, module.qk_rope_dim, module.kv_lora_rank
    nope = module.nope_dim
    query, k_rope, latent = module.project(hidden_states, position_embeddings)  # [b, H, 1, d_r + nope], ...
    keys, rows = layer.append(k_rope, latent)  # [b, n_rope, L, d_r], [b, L, r (+ n_kv)]
    keep = None if attention_mask is None else attention_mask[:, 0, -1, :rows.shape[1]]  # [b, L]
    window = module.sliding_window
    if window is not None and rows.shape[1] > window:  # transformers' sliding mask: the last `window` tokens
        keys, rows = keys[:, :, -window:], rows[:, -window:]
        keep = None if keep is None else keep[:, -window:]
    query = query[:, :, 0].view(b, n_kv, heads // n_kv, d_r + nope)
    q_rot, q_nope = query.split([d_r, nope], dim=-1)  # [b, n_kv, g, d_r], [b, n_kv, g, nope]
    if layer.joint:  # rows [latent; shared RoPE key]: DeepSeek's absorbed step, one fused pass over the rows
        w_uk, w_uv = split_kv_b(module.kv_b_proj.weight, heads, nope, d)  # [H, nope, r], [H, d, r]
        out = mla_decode_attention(q_nope.reshape(b, heads, nope), q_rot.reshape(b, heads, d_r), rows, w_uk, w_uv,
                                   module.scaling, keep, backend)  # [b, H, d]
        return module.o_proj(out.reshape(b, 1, heads * d))
    key_scale = None
    if module.k_norm is not None:  # the norm's weight on the NoPE dims goes to the query, its 1/rms to the scores
        nope_dims = module._index(query.device)[1]  # [n_kv, d - d_r]
        q_nope = q_nope * module.k_norm.weight[nope_dims][None, :, None]
        key_scale = rows[..., rank:]  # [b, L, n_kv]
    w_uk, w_uv = split_kv_b(module.kv_b_proj.weight, n_kv, nope, d)  # [n_kv, nope, r], [n_kv, d, r]
    out = grouped_mla_decode_attention(q_nope, q_rot, rows[..., :rank], keys, w_uk, w_uv, module.scaling, keep,
                                       key_scale, backend)  # [b, n_kv, g, d]
    return module.o_proj(out.reshape(b, 1, heads * d))


def _forward(module, own_forward, backend: str):
    def forward(hidden_states, position_embeddings, attention_mask=None, cache=None, **kwargs):
        if not isinstance(cache, RopeLatentKVCache) or hidden_states.shape[1] != 1:
            return own_forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.dtype != torch.bool):
            raise ValueError("the MLA decode attention takes a boolean keep-mask [b, 1, s, k] or None")
        layer = cache.layers[module.layer_idx]
        return _step(module, hidden_states, position_embeddings, attention_mask, layer, backend), None

    return forward


@contextmanager
def attnconv_mla_decode(model, backend: str = "auto") -> Iterator[int]:
    """Within this block MODEL's attnconv-format MLA layers run absorbed one-token steps when given a
    `RopeLatentKVCache`, and prefill through attnconv's decode attention; the model's own forwards and attention
    implementation are restored after it. Yields the number of layers patched."""
    reason = unsupported_reason(model)
    if reason is not None:
        raise AttnconvError(f"attnconv's MLA decode cannot run this model: {reason}")
    with attention_implementation(model, NAME, sdpa_gqa_attention), \
            instance_forwards(mla_modules(model), lambda m, own: _forward(m, own, backend)) as patched:
        yield patched

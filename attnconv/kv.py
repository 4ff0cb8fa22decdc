"""KV-cache arithmetic from a model config: what a model stores per token, and in total."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass(frozen=True)
class CacheShape:
    """What one token costs in the KV cache: `layers x kv_dim_per_layer` values, stored once per token."""

    layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    kv_dim_per_layer: int  # K and V together, in values (2 x n_kv x head_dim for MHA/GQA/MQA)

    def bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.layers * self.kv_dim_per_layer * dtype_bytes

    def bytes(self, batch: int, context: int, dtype_bytes: int = 2) -> int:
        """l x b x n_kv x head_dim x s x 2 x bytes."""
        return batch * context * self.bytes_per_token(dtype_bytes)


def _get(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


def cache_shape(config) -> CacheShape:
    """Read layers/heads/head_dim from any causal-LM config (Llama-like, GPT-2, GPTBigCode, attnconv MLA)."""
    layers = _get(config, "num_hidden_layers", "n_layer")
    n_heads = _get(config, "num_attention_heads", "n_head")
    hidden = _get(config, "hidden_size", "n_embd")
    head_dim = _get(config, "head_dim", default=hidden // n_heads)
    if getattr(config, "model_type", None) == "gpt_bigcode":
        n_kv = 1 if config.multi_query else n_heads
    else:
        n_kv = _get(config, "num_key_value_heads", default=n_heads)
    kv_dim = getattr(config, "kv_cache_dim_per_layer", None) or 2 * n_kv * head_dim
    return CacheShape(layers, n_heads, n_kv, head_dim, kv_dim)


def dtype_bytes(dtype: torch.dtype | str) -> int:
    if isinstance(dtype, str):
        from attnconv.hub import parse_dtype

        dtype = parse_dtype(dtype) or torch.float32
    return DTYPE_BYTES[dtype]


def max_positions(config) -> int | None:
    """The longest sequence a config allows, whatever the family calls it (None when it says nothing)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None

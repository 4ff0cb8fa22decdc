"""In-memory glue between a loaded Llama-like / Phi-3 model's state dict and `AttentionLayer`s.

For tests, studies and small models; a checkpoint conversion goes through the family adapters instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnconv.convert.gqa_heads import AttentionLayer


def _shape(config) -> tuple[int, int, int]:
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, config.num_key_value_heads, head_dim


def attention_layers(sd: dict[str, Tensor], config) -> list[AttentionLayer]:
    """One AttentionLayer per decoder layer of a transformers Llama/Mistral/Qwen2/Qwen3/Gemma/Phi-3 state dict."""
    n_heads, n_kv, d = _shape(config)
    layers = []
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.self_attn."
        if p + "qkv_proj.weight" in sd:  # Phi-3: rows q | k | v
            q, k, v = sd[p + "qkv_proj.weight"].split([n_heads * d, n_kv * d, n_kv * d])
        else:
            q, k, v = (sd[f"{p}{n}_proj.weight"] for n in "qkv")
        layers.append(AttentionLayer(
            q, k, v, sd[p + "o_proj.weight"], n_heads, n_kv, d,
            q_bias=sd.get(p + "q_proj.bias"), k_bias=sd.get(p + "k_proj.bias"), v_bias=sd.get(p + "v_proj.bias"),
            q_norm=sd.get(p + "q_norm.weight"), k_norm=sd.get(p + "k_norm.weight")))
    return layers


def with_attention_layers(sd: dict[str, Tensor], layers: list[AttentionLayer]) -> dict[str, Tensor]:
    """A copy of `sd` with every layer's attention projections replaced (shapes may change: fewer KV heads)."""
    out = dict(sd)
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}.self_attn."
        if p + "qkv_proj.weight" in sd:
            out[p + "qkv_proj.weight"] = torch.cat([layer.q, layer.k, layer.v])
        else:
            for n, w, b in (("q", layer.q, layer.q_bias), ("k", layer.k, layer.k_bias), ("v", layer.v, layer.v_bias)):
                out[f"{p}{n}_proj.weight"] = w
                if b is not None:
                    out[f"{p}{n}_proj.bias"] = b
        out[p + "o_proj.weight"] = layer.o
    return out

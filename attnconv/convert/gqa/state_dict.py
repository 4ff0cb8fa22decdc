"""In-memory glue between a loaded Llama-like / Phi-3 model's state dict and `AttentionWeights`s.

For tests, studies and small models; a checkpoint conversion goes through the family adapters instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnconv.convert.attention_weights import AttentionWeights, from_tensors, fused_qkv_key, shape_of


def attention_layers(sd: dict[str, Tensor], config) -> list[AttentionWeights]:
    """One AttentionWeights per decoder layer of a transformers Llama/Mistral/Qwen2/Qwen3/Gemma/Phi-3 state dict."""
    shape, prefix = shape_of(config), "model.layers.{}.self_attn."
    eps = float(getattr(config, "rms_norm_eps", 1e-6))
    return [from_tensors({k.removeprefix(prefix.format(i)): v for k, v in sd.items() if k.startswith(prefix.format(i))},
                         shape, eps) for i in range(config.num_hidden_layers)]


def with_attention_layers(sd: dict[str, Tensor], layers: list[AttentionWeights]) -> dict[str, Tensor]:
    """A copy of `sd` with every layer's attention projections replaced (shapes may change: fewer KV heads)."""
    out = dict(sd)
    for i, layer in enumerate(layers):
        p = f"model.layers.{i}.self_attn."
        if fused := fused_qkv_key({k.removeprefix(p) for k in sd if k.startswith(p)}):
            out[p + fused] = torch.cat([layer.q, layer.k, layer.v])
        else:
            for n, w, b in (("q", layer.q, layer.q_bias), ("k", layer.k, layer.k_bias), ("v", layer.v, layer.v_bias)):
                out[f"{p}{n}_proj.weight"] = w
                if b is not None:
                    out[f"{p}{n}_proj.bias"] = b
        out[p + "o_proj.weight"] = layer.o
    return out

"""The family-free form of one attention layer that MLA conversions read.

Family adapters (and `from_hf_attention` for a loaded model) produce it; conversions never see family names.
Weights are Linear layout ([out, in]) in float32. RoPE is Hugging Face's "rotate_half": dims [0, rotary_dim) are
rotated in pairs (i, i + rotary_dim / 2) with frequency theta^(-2i / rotary_dim); dims from rotary_dim on (Phi-3's
partial rotary) carry no position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AttentionShape:
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    rotary_dim: int  # leading dims of each head that RoPE rotates (= head_dim unless partial rotary)
    scaling: float  # softmax scale of q.k (head_dim ** -0.5 for every supported family)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def rotary_pairs(self) -> int:
        return self.rotary_dim // 2

    def kv_head_of(self) -> Tensor:
        """[n_heads]: the KV head each query head reads (contiguous groups, as repeat_kv)."""
        return torch.arange(self.n_heads) // self.group_size


@dataclass
class AttentionWeights:
    """One layer's q/k/v/o projections (+ optional biases and Qwen3-style per-head q/k RMSNorm weights)."""

    shape: AttentionShape
    q: Tensor  # [n_heads * head_dim, hidden]
    k: Tensor  # [n_kv * head_dim, hidden]
    v: Tensor  # [n_kv * head_dim, hidden]
    o: Tensor  # [hidden, n_heads * head_dim]
    q_bias: Tensor | None = None  # [n_heads * head_dim]
    k_bias: Tensor | None = None  # [n_kv * head_dim]
    v_bias: Tensor | None = None  # [n_kv * head_dim]
    o_bias: Tensor | None = None  # [hidden]
    q_norm: Tensor | None = None  # [head_dim] RMSNorm weight over each query head, before RoPE
    k_norm: Tensor | None = None  # [head_dim] RMSNorm weight over each key head, before RoPE
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias", "q_norm", "k_norm"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.detach().float())

    def heads(self, which: str) -> Tensor:
        """q/k/v weights per head: [n, head_dim, hidden]."""
        w = getattr(self, which)
        return w.reshape(-1, self.shape.head_dim, self.shape.hidden)

    def head_bias(self, which: str) -> Tensor | None:
        """q/k/v biases per head: [n, head_dim] or None."""
        b = getattr(self, f"{which}_bias")
        return None if b is None else b.reshape(-1, self.shape.head_dim)


def rotary_dim_of(config) -> int:
    """RoPE dims per head from a transformers config (Phi-3 and others may rotate only a leading part)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    return int(head_dim * factor)


def from_hf_attention(attn, config) -> AttentionWeights:
    """The neutral form of a loaded transformers attention module (Llama, Mistral, Qwen2/3, Gemma, Phi-3)."""
    head_dim = attn.head_dim
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    shape = AttentionShape(n_heads, n_kv, head_dim, config.hidden_size, rotary_dim_of(config), attn.scaling)

    def bias(m):
        return None if m.bias is None else m.bias

    if hasattr(attn, "qkv_proj"):  # Phi-3: rows q | k | v
        q, k, v = attn.qkv_proj.weight.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim])
        qb = kb = vb = None
    else:
        q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
        qb, kb, vb = bias(attn.q_proj), bias(attn.k_proj), bias(attn.v_proj)
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    eps = getattr(k_norm, "variance_epsilon", getattr(k_norm, "eps", 1e-6)) if k_norm is not None else 1e-6
    return AttentionWeights(shape, q, k, v, attn.o_proj.weight, qb, kb, vb, bias(attn.o_proj),
                            None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight,
                            eps)

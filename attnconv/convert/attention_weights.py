"""The family-free form of one attention layer that MLA conversions read.

Family adapters (and `from_hf_attention` for a loaded model) produce it; conversions never see family names.
Weights are Linear layout ([out, in]) in float32. RoPE is Hugging Face's "rotate_half": dims [0, rotary_dim) are
rotated in pairs (i, i + rotary_dim / 2) with frequency theta^(-2i / rotary_dim); dims from rotary_dim on (Phi-3's
partial rotary) carry no position.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from attnconv.families import FAMILIES
from attnconv.model_shape import rotary_dim_of


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
        s, d = self.shape, self.shape.head_dim
        if d % 2 or s.n_heads % s.n_kv_heads:
            raise ValueError(f"head_dim {d} must be even and n_kv_heads {s.n_kv_heads} divide n_heads {s.n_heads}")
        expected = {"q": (s.n_heads * d, s.hidden), "k": (s.n_kv_heads * d, s.hidden),
                    "v": (s.n_kv_heads * d, s.hidden), "o": (s.hidden, s.n_heads * d)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} has shape {tuple(getattr(self, name).shape)}, expected {shape}")

    # The shape's counts, as the GQA methods read them.
    @property
    def n_heads(self) -> int:
        return self.shape.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.shape.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.shape.head_dim

    @property
    def hidden(self) -> int:
        return self.shape.hidden

    def heads(self, which: str) -> Tensor:
        """q/k/v weights per head: [n, head_dim, hidden]."""
        w = getattr(self, which)
        return w.reshape(-1, self.shape.head_dim, self.shape.hidden)

    def head_bias(self, which: str) -> Tensor | None:
        """q/k/v biases per head: [n, head_dim] or None."""
        b = getattr(self, f"{which}_bias")
        return None if b is None else b.reshape(-1, self.shape.head_dim)


def shape_of(config) -> AttentionShape:
    """The attention shape of a transformers config object or a config.json dict (the six Llama-like families:
    their softmax scale is head_dim ** -0.5)."""
    from attnconv.model_shape import config_value

    n_heads = config_value(config, "num_attention_heads")
    hidden = config_value(config, "hidden_size")
    head_dim = config_value(config, "head_dim") or hidden // n_heads
    n_kv = config_value(config, "num_key_value_heads") or n_heads
    return AttentionShape(n_heads, n_kv, head_dim, hidden, rotary_dim_of(config), head_dim ** -0.5)


def fused_qkv_key(names) -> str | None:
    """The fused q | k | v weight among one layer's attention tensor names (relative to the attention module), as
    a family record names it (Phi-3: `qkv_proj.weight`), or None."""
    return next((key for f in FAMILIES.values() if f.fused_qkv and (key := f"{f.fused_qkv}.weight") in names), None)


def from_tensors(tensors: dict[str, Tensor], shape: AttentionShape, norm_eps: float = 1e-6) -> AttentionWeights:
    """The neutral form of one layer from its attention tensors, named relative to the attention module
    (`q_proj.weight`, ... or a fused q | k | v such as Phi-3's `qkv_proj.weight`; optional biases and q/k norms)."""
    d = shape.head_dim
    if fused := fused_qkv_key(tensors):  # rows q | k | v
        q, k, v = tensors[fused].split([shape.n_heads * d, shape.n_kv_heads * d, shape.n_kv_heads * d])
    else:
        q, k, v = (tensors[f"{p}_proj.weight"] for p in "qkv")
    return AttentionWeights(shape, q, k, v, tensors["o_proj.weight"], tensors.get("q_proj.bias"),
                            tensors.get("k_proj.bias"), tensors.get("v_proj.bias"), tensors.get("o_proj.bias"),
                            tensors.get("q_norm.weight"), tensors.get("k_norm.weight"), norm_eps)


def from_hf_attention(attn, config) -> AttentionWeights:
    """The neutral form of a loaded transformers attention module (Llama, Mistral, Qwen2/3, Gemma, Phi-3)."""
    norm = getattr(attn, "k_norm", None)
    eps = float(getattr(config, "rms_norm_eps", None) or 1e-6)  # the model's norms' eps, as from_tensors is given
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", eps)) if norm is not None else eps
    shape = replace(shape_of(config), head_dim=attn.head_dim, scaling=attn.scaling)
    return from_tensors(dict(attn.named_parameters()), shape, eps)

"""A model's shape read from its config, whatever the family: head counts, KV-cache cost, RoPE dims, positions.

Family-free (families.py holds what differs per family and builds these); torch- and transformers-free: every
function reads a config.json dict and a transformers config object alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """The first of `names` set in a config dict or object."""
    for n in names:
        v = config.get(n) if isinstance(config, dict) else getattr(config, n, None)
        if v is not None:
            return v
    return default


@dataclass(frozen=True)
class HeadLayout:
    """The attention shape of a model, family-free."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    layers: int
    rope: str = "rotate_half"  # HF Llama-style rotary on halves; "none" for learned positions (GPT-2)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class CacheShape:
    """What one token costs in the KV cache: `layers x values_per_layer` values, stored once per token."""

    layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    values_per_layer: float  # K and V together (2 x n_kv x head_dim for MHA/GQA/MQA; latent + RoPE keys for MLA;
    # the mean over layers where MLA ranks differ per layer)
    latent: bool = False  # MLA: one row per token shared by every head, not per-head K and V

    def bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return round(self.layers * self.values_per_layer * dtype_bytes)

    def bytes(self, batch: int, context: int, dtype_bytes: int = 2) -> int:
        """layers x batch x context x values_per_layer x bytes."""
        return batch * context * self.bytes_per_token(dtype_bytes)


def rotary_dim_of(config: Any) -> int:
    """RoPE dims per head from a transformers config or config.json dict (Phi-3 and others may rotate only a
    leading part)."""
    head_dim = config_value(config, "head_dim") or (config_value(config, "hidden_size")
                                                    // config_value(config, "num_attention_heads"))
    params = config_value(config, "rope_parameters") or {}
    factor = params.get("partial_rotary_factor", config_value(config, "partial_rotary_factor", default=1.0))
    return int(head_dim * factor)


def max_positions(config: Any) -> int | None:
    """The longest sequence a config allows, whatever the family calls it (None when it says nothing)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = config_value(config, name)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None

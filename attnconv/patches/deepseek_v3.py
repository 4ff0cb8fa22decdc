"""DeepseekV3 (MLA) in attnconv's decode loop: a latent cache, absorbed one-token steps.

transformers' DeepseekV3Attention caches the latent but expands per-head K/V from the whole cache at every step,
so a decode step costs more than an MHA model's. Within `mla_decode(model)` each attention layer's forward is
replaced (on the module instance; the class is untouched): it writes `[latent; rotated RoPE key]` into the
`LatentKVCache` (decode_cache.py) and
- prefill (several tokens): the unabsorbed form, keys and values expanded from the latent of the filled rows and
  attended with SDPA as `sdpa_gqa_attention` does (causal, plus the loop's padding keep-mask): for many queries the
  expanded form costs fewer FLOPs, and it is what transformers computes;
- one-token steps: the absorbed form (kernels/mla_attention.py), which reads r + d_r values per cached token.
The model's attention is registered as "attnconv_mla_decode" in the block, with transformers' SDPA function and
mask builder: the loop's keep-masks ([b, 1, s, k] booleans) pass through as they are, and without a
`LatentKVCache` (or outside the block) the model's own forward runs as under "sdpa".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from attnconv.errors import AttnconvError
from attnconv.kernels.mla_attention import expand_latent, mla_decode_attention, split_kv_b
from attnconv.patches.attention import attention_implementation, instance_forwards
from attnconv.patches.decode_attention import sdpa_gqa_attention
from attnconv.patches.decode_cache import LatentKVCache

NAME = "attnconv_mla_decode"


def _rotary(config):
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

    return ds.apply_rotary_pos_emb_interleave if config.rope_interleave else ds.apply_rotary_pos_emb


def _query(module, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [b, s, D] -> queries [b, H, s, d_nope + d_r] (with or without the query low-rank path)."""
    if module.q_lora_rank is None:
        q = module.q_proj(hidden)
    else:
        q = module.q_b_proj(module.q_a_layernorm(module.q_a_proj(hidden)))
    b, s, _ = hidden.shape
    return q.view(b, s, module.num_heads, module.qk_head_dim).transpose(1, 2)


def _one_head_size(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """Zero columns that give queries/keys and values one head size: torch's fused SDPA kernels (CPU flash) need
    it, and the math fallback they leave holds a [b, H, s, s] score matrix (25.8 GB for 8 x 8192 tokens of 12
    heads). Zeros add nothing to q . k; the values' zero columns are dropped from the output."""
    width = max(query.shape[-1], values.shape[-1])
    if query.shape[-1] < width:
        query, keys = F.pad(query, (0, width - query.shape[-1])), F.pad(keys, (0, width - keys.shape[-1]))
    if values.shape[-1] < width:
        values = F.pad(values, (0, width - values.shape[-1]))
    return query, keys, values


def _keep(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """The loop's decode keep-mask [b, 1, 1, >= L] -> [b, L] (None: no padding)."""
    return None if attention_mask is None else attention_mask[:, 0, -1, :length]


def _forward(module, own_forward, backend: str):
    rotate = _rotary(module.config)
    nope, rope, v_dim, rank = module.qk_nope_head_dim, module.qk_rope_head_dim, module.v_head_dim, module.kv_lora_rank

    def forward(hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        if not isinstance(cache, LatentKVCache):
            return own_forward(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        if attention_mask is not None and (attention_mask.dim() != 4 or attention_mask.dtype != torch.bool):
            raise ValueError("the MLA decode attention takes a boolean keep-mask [b, 1, s, k] or None")
        b, s, _ = hidden_states.shape
        q_nope, q_rot = _query(module, hidden_states).split([nope, rope], dim=-1)  # [b, H, s, d_nope / d_r]
        latent, k_rot = module.kv_a_proj_with_mqa(hidden_states).split([rank, rope], dim=-1)
        latent = module.kv_a_layernorm(latent)  # [b, s, r]
        cos, sin = position_embeddings
        q_rot, k_rot = rotate(q_rot, k_rot[:, None], cos, sin)  # [b, H, s, d_r], [b, 1, s, d_r]
        layer = cache.layers[module.layer_idx]
        start = layer.length
        rows = layer.append(latent, k_rot[:, 0])  # [b, L, r + d_r], this call's tokens included
        if s == 1:
            w_uk, w_uv = split_kv_b(module.kv_b_proj.weight, module.num_heads, nope, v_dim)
            out = mla_decode_attention(q_nope[:, :, 0], q_rot[:, :, 0], rows, w_uk, w_uv, module.scaling,
                                       _keep(attention_mask, rows.shape[1]), backend)  # [b, H, d_v]
        else:
            source = rows if start else torch.cat([latent, k_rot[:, 0]], dim=-1)  # contiguous for a fresh prefill
            keys, values = expand_latent(source[..., :rank], source[..., rank:], module.kv_b_proj.weight,
                                         module.num_heads, nope, v_dim)  # [b, H, L, d_nope + d_r], [b, H, L, d_v]
            query = torch.cat([q_nope, q_rot], dim=-1)
            query, keys, values = _one_head_size(query, keys, values)
            out, _ = sdpa_gqa_attention(module, query, keys, values, attention_mask, scaling=module.scaling)
            out = out[..., :v_dim]  # [b, s, H, d_v]
        return module.o_proj(out.reshape(b, s, module.num_heads * v_dim)), None

    return forward


def check_mla_model(model) -> None:
    """Refuse what the absorbed decode does not cover (one line, with what to do)."""
    config = model.config
    if getattr(config, "model_type", None) != "deepseek_v3":
        raise AttnconvError(f"the MLA decode patch is for deepseek_v3 models, not {config.model_type!r}")
    if getattr(config, "qk_rope_head_dim", 0) % 2:
        raise AttnconvError(f"qk_rope_head_dim must be even for RoPE, got {config.qk_rope_head_dim}")


@contextmanager
def mla_decode(model, backend: str = "auto") -> Iterator[int]:
    """Within this block MODEL's DeepseekV3 attention layers run the latent-cache forward when given a
    `LatentKVCache`; the model's own forwards are restored after it. Yields the number of layers patched."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    check_mla_model(model)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    modules = [m for m in model.modules() if isinstance(m, DeepseekV3Attention)]
    with attention_implementation(model, NAME, sdpa_attention_forward, sdpa_mask), \
            instance_forwards(modules, lambda m, own: _forward(m, own, backend)) as patched:
        yield patched

"""attnconv's MLA models: a source family's own classes with only the attention replaced (format "attnconv").

Each family gets a config subclass (model_type "<family>_mla", plus kv_lora_rank, qk_rope_dim, rope_pairs, rope_key) and
model subclasses whose decoder layers use `MLAAttention`; embeddings, norms, MLPs, rotary embeddings, masks and
caches stay the family's. `register_auto_classes()` makes `AutoModelForCausalLM.from_pretrained` load them.

Per token and layer the cache holds (keys slot) the kept RoPE dims of every KV head, rotated as in the source,
[b, n_kv, t, rope_dim], and (values slot) the joint latent [b, 1, t, kv_lora_rank]; for families with per-head
k norms (Qwen3) the latent is followed by each KV head's 1/rms of its reconstructed key, so the norm is over
the full head key and RoPE follows it, as in the source. NoPE keys and values are rebuilt from the latent at
every step (kv_b_proj), like DeepSeek's unabsorbed attention. With rope_key "shared" (convert/mla/attnconv_shared.py)
the keys slot holds one RoPE key for all heads [b, 1, t, rope_dim], each query head has rope_dim RoPE dims of its own
beside head_dim NoPE dims, and the latent has one block per query head (num_key_value_heads = the query heads).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from attnconv.errors import AttnconvError
from attnconv.families import FAMILIES, ROPE_FAMILIES, Family, mla_architecture, on_family_change
from attnconv.model_shape import rotary_dim_of
from attnconv.models.mla_layout import nope_dims, rope_dims


@dataclass(frozen=True)
class FamilyAttention:
    """How a family's attention differs (its record, attnconv/families.py), with its q/k norm class resolved."""

    record: Family
    qk_norm: type | None = None

    def q_bias(self, config) -> bool:
        return self.record.has_bias("qkv", config)

    kv_bias = q_bias

    def o_bias(self, config) -> bool:
        return self.record.has_bias("o", config)

    def sliding_window(self, config, layer: int) -> int | None:
        return self.record.sliding_window(config, layer)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _kv_lora_rank(config, layer_idx: int) -> int:
    r = config.kv_lora_rank
    return r[layer_idx] if isinstance(r, (list, tuple)) else r


class MLAAttention(nn.Module):
    """Partial-RoPE keys per KV head (or one shared by all heads) plus NoPE keys and values from one joint latent
    (attnconv format)."""

    def __init__(self, config, layer_idx: int, family: FamilyAttention):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        self.num_key_value_groups = self.n_heads // self.n_kv
        self.scaling = self.head_dim**-0.5  # every supported family scales by head_dim ** -0.5
        self.attention_dropout = getattr(config, "attention_dropout", 0.0)
        self.is_causal = True
        self.sliding_window = family.sliding_window(config, layer_idx)
        self.rotary_dim = rotary_dim_of(config)
        self.kv_lora_rank = _kv_lora_rank(config, layer_idx)
        self.qk_rope_dim = config.qk_rope_dim
        d, dr, hidden = self.head_dim, self.qk_rope_dim, config.hidden_size
        # "shared": one RoPE key for all heads, each query head with its own RoPE dims beside a full NoPE key
        self.shared_rope = getattr(config, "rope_key", None) == "shared"
        self.n_rope = 1 if self.shared_rope else self.n_kv  # RoPE key heads (cached)
        self.nope_dim = d if self.shared_rope else d - dr  # NoPE key dims per latent head
        if self.shared_rope and family.qk_norm is not None:
            raise AttnconvError("rope_key 'shared' cannot hold per-head q/k norms (Qwen3); the config is damaged")

        # Index tensors, not buffers: from_pretrained builds modules on the meta device, where they would be lost.
        pairs = torch.tensor(config.rope_pairs[layer_idx], dtype=torch.long, device="cpu")  # [n_rope, rope_dim / 2]
        rope = rope_dims(pairs, self.rotary_dim)  # [n_rope, d_r]
        self._dims = {"cpu": (rope, nope_dims(rope, d))}  # device -> (rope dims, NoPE dims [n_rope, d - d_r])

        q_rows = self.n_heads * (dr + d if self.shared_rope else d)
        self.q_proj = nn.Linear(hidden, q_rows, bias=family.q_bias(config))
        self.k_rope_proj = nn.Linear(hidden, self.n_rope * dr, bias=family.kv_bias(config))
        self.kv_a_proj = nn.Linear(hidden, self.kv_lora_rank, bias=family.kv_bias(config))
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, self.n_kv * (self.nope_dim + d), bias=False)
        self.o_proj = nn.Linear(self.n_heads * d, hidden, bias=family.o_bias(config))
        self.q_norm = self.k_norm = None
        if family.qk_norm is not None:
            self.q_norm = family.qk_norm(d, eps=config.rms_norm_eps)
            self.k_norm = family.qk_norm(d, eps=config.rms_norm_eps)
        self.cache_latent_dim = self.kv_lora_rank + (self.n_kv if self.k_norm is not None else 0)

    def _index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._dims:
            self._dims[key] = tuple(t.to(device) for t in self._dims["cpu"])
        return self._dims[key]

    def _per_query_head(self, dims: torch.Tensor) -> torch.Tensor:
        return dims.repeat_interleave(self.num_key_value_groups, dim=0)  # [n_heads, m]

    def _expand(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [b, 1, t, r] -> NoPE keys [b, n_kv, t, nope_dim], values [b, n_kv, t, d]."""
        b, _, t, _ = latent.shape
        kv = self.kv_b_proj(latent).view(b, t, self.n_kv, -1).transpose(1, 2)
        return kv.split([self.nope_dim, self.head_dim], dim=-1)

    def project(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]):
        """hidden [b, t, D] -> query [b, H, t, d_r + nope_dim] (RoPE dims rotated, then NoPE dims), rotated RoPE
        keys [b, n_rope, t, d_r] and what the cache's values slot holds: [b, 1, t, r (+ n_kv 1/rms for k norms)]."""
        b, t, _ = hidden_states.shape
        cos, sin = position_embeddings  # [b, t, rotary_dim]
        rot = self.rotary_dim
        rope_dims_, nope_dims_ = self._index(hidden_states.device)
        cos_k = cos[:, :, rope_dims_].transpose(1, 2)  # [b, n_rope, t, d_r]
        sin_k = sin[:, :, rope_dims_].transpose(1, 2)

        if self.shared_rope:  # each query head's own RoPE rows, rotated at the shared key's frequencies
            q_rope, q_nope = self.q_proj(hidden_states).view(b, t, self.n_heads, -1).transpose(1, 2).split(
                [self.qk_rope_dim, self.head_dim], dim=-1)  # [b, H, t, d_r], [b, H, t, d]
            query = torch.cat([q_rope * cos_k + _rotate_half(q_rope) * sin_k, q_nope], dim=-1)
        else:
            q = self.q_proj(hidden_states).view(b, t, self.n_heads, self.head_dim)
            if self.q_norm is not None:
                q = self.q_norm(q)
            q = q.transpose(1, 2)  # [b, H, t, d]
            c, s = cos.unsqueeze(1), sin.unsqueeze(1)
            q_rotated = torch.cat([q[..., :rot] * c + _rotate_half(q[..., :rot]) * s, q[..., rot:]], dim=-1)
            rope_q = self._per_query_head(rope_dims_)[None, :, None].expand(b, -1, t, -1)
            nope_q = self._per_query_head(nope_dims_)[None, :, None].expand(b, -1, t, -1)
            query = torch.cat([q_rotated.gather(-1, rope_q), q.gather(-1, nope_q)], dim=-1)

        k_rope = self.k_rope_proj(hidden_states).view(b, t, self.n_rope, self.qk_rope_dim).transpose(1, 2)
        latent = self.kv_a_proj(hidden_states).view(b, 1, t, self.kv_lora_rank)
        if self.k_norm is not None:  # 1/rms over the full head key (kept RoPE dims + reconstructed NoPE dims)
            k_nope = self._expand(latent)[0]
            ms = (k_rope.float().pow(2).sum(-1) + k_nope.float().pow(2).sum(-1)) / self.head_dim  # [b, n_kv, t]
            inv_rms = torch.rsqrt(ms + self.k_norm.variance_epsilon)
            k_rope = self.k_norm.weight[rope_dims_][None, :, None] * (
                k_rope.float() * inv_rms[..., None]).to(k_rope.dtype)
            latent = torch.cat([latent, inv_rms.transpose(1, 2)[:, None].to(latent.dtype)], dim=-1)
        k_rope = k_rope * cos_k + _rotate_half(k_rope) * sin_k
        return query, k_rope, latent

    def keys_values(self, k_rope: torch.Tensor, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached RoPE keys [b, n_rope, T, d_r] and latent rows [b, 1, T, r (+ n_kv)] -> keys [b, n_kv, T,
        d_r + nope_dim] and values [b, n_kv, T, d], the NoPE keys and values rebuilt from the latent (unabsorbed)."""
        _, nope_dims_ = self._index(latent.device)
        k_nope, value = self._expand(latent[..., : self.kv_lora_rank])
        if self.k_norm is not None:
            inv_rms = latent[..., self.kv_lora_rank:].squeeze(1).transpose(1, 2)[..., None]  # [b, n_kv, T, 1]
            k_nope = self.k_norm.weight[nope_dims_][None, :, None] * (
                k_nope.float() * inv_rms.float()).to(k_nope.dtype)
        return torch.cat([k_rope.expand(-1, self.n_kv, -1, -1), k_nope], dim=-1), value

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, **kwargs):
        b, t, _ = hidden_states.shape
        query, k_rope, latent = self.project(hidden_states, position_embeddings)
        if cache is not None:
            k_rope, latent = cache.update(k_rope, latent, self.layer_idx, kwargs=kwargs)
        key, value = self.keys_values(k_rope, latent)

        if self.shared_rope:  # values narrower than queries: SDPA's fused kernels need one head size (else the
            value = F.pad(value, (0, self.qk_rope_dim))  # math kernel, [b, H, t, T] scores); cut after attention
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_attention)
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, sliding_window=self.sliding_window, **kwargs)
        return self.o_proj(out[..., :self.head_dim].reshape(b, t, -1).contiguous()), weights


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _use_mla(layers, config, family: FamilyAttention) -> None:
    for i, layer in enumerate(layers):
        old = layer.self_attn
        layer.self_attn = MLAAttention(config, i, family).to(device=old.o_proj.weight.device,
                                                              dtype=old.o_proj.weight.dtype)


def _family_classes(name: str) -> tuple:
    """(config class, base model class, causal-LM class, FamilyAttention) of a RoPE source family, found through
    transformers' Auto mappings by its model_type (a family registered at run time is found the same way)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

    record = FAMILIES[name]
    if record.model_types[0] not in CONFIG_MAPPING:
        raise AttnconvError(f"transformers does not know model_type {record.model_types[0]!r} of family {name!r}; "
                            "register its classes with AutoConfig, AutoModel and AutoModelForCausalLM first")
    config_cls = CONFIG_MAPPING[record.model_types[0]]
    causal_cls = MODEL_FOR_CAUSAL_LM_MAPPING[config_cls]
    norm = getattr(sys.modules[causal_cls.__module__], f"{record.hf_name}RMSNorm") if record.qk_norm else None
    return config_cls, MODEL_MAPPING[config_cls], causal_cls, FamilyAttention(record, norm)


_MLA_FIELDS = {"kv_lora_rank": (int | list[int], 0), "qk_rope_dim": (int, 0), "rope_pairs": (list | None, None),
               "mla_init": (str | None, None), "rope_key": (str | None, None),
               "kv_cache_dim_per_layer": (int | float | None, None)}


def _make_classes(source_type: str, config_cls, base_cls, causal_cls, family: FamilyAttention):
    model_type, arch = mla_architecture(source_type)
    prefix = arch.removesuffix("ForCausalLM")
    namespace = {"model_type": model_type, "__annotations__": {k: t for k, (t, _) in _MLA_FIELDS.items()},
                 "__module__": __name__, **{k: v for k, (_, v) in _MLA_FIELDS.items()}}
    mla_config = type(f"{prefix}Config", (config_cls,), namespace)

    def base_init(self, config):
        base_cls.__init__(self, config)
        _use_mla(self.layers, config, family)

    def causal_init(self, config):
        causal_cls.__init__(self, config)
        _use_mla(self.model.layers, config, family)

    common = {"config_class": mla_config, "__module__": __name__}
    mla_base = type(f"{prefix}Model", (base_cls,), {"__init__": base_init, **common})
    mla_causal = type(arch, (causal_cls,), {"__init__": causal_init, **common})
    return mla_config, mla_base, mla_causal


CLASSES: dict[str, tuple] = {}  # source model_type -> (config, base model, causal LM) classes, once registered


def register_auto_classes() -> None:
    """Register every RoPE family's MLA config and models with transformers' Auto classes (idempotent; run again
    whenever a family is registered or unregistered)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for gone in set(CLASSES) - set(ROPE_FAMILIES):
        del CLASSES[gone]
    for source_type in ROPE_FAMILIES:
        if source_type in CLASSES:
            continue
        config_cls, base_cls, causal_cls, family = _family_classes(source_type)
        mla_config, mla_base, mla_causal = _make_classes(source_type, config_cls, base_cls, causal_cls, family)
        AutoConfig.register(mla_config.model_type, mla_config, exist_ok=True)
        AutoModel.register(mla_config, mla_base, exist_ok=True)
        AutoModelForCausalLM.register(mla_config, mla_causal, exist_ok=True)
        CLASSES[source_type] = (mla_config, mla_base, mla_causal)


register_auto_classes()  # importing this module is what makes the classes known (idempotent)
on_family_change(register_auto_classes)

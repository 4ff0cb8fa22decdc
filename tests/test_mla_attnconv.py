"""MHA/GQA -> MLA in attnconv's format: lossless where the algebra is, cache sizes as stated, save/load round trip.

The reference is transformers' own source model (float32 logits), and for low ranks the Eckart-Young bound of a
truncated SVD computed here with torch.linalg.svd.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from attnconv.convert.attention_weights import from_hf_attention
from attnconv.convert.mla.attnconv_format import (
    attnconv_output_shapes,
    cache_per_token,
    convert_attnconv_layer,
    latent_target,
    max_kv_rank,
)
from attnconv.convert.mla.inmemory import to_attnconv_mla
from attnconv.convert.mla.rope import select_pairs
from attnconv.families import ROPE_FAMILIES
from attnconv.model_shape import rotary_dim_of
from attnconv.models.mla import register_auto_classes
from attnconv.testing import build_tiny_model

FAMILIES = ROPE_FAMILIES


def _source(tmp_path, family: str, n_kv: int):
    extra = None
    if family == "phi3":  # partial rotary: the latent then carries NoPE key dims even with every pair kept
        extra = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}
    path = build_tiny_model(family, tmp_path / f"{family}-{n_kv}", n_heads=4, n_kv_heads=n_kv, extra=extra)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("n_kv", [4, 2])
def test_full_rank_all_pairs_is_lossless(tmp_path, family, n_kv):
    source = _source(tmp_path, family, n_kv)
    w = from_hf_attention(source.model.layers[0].self_attn, source.config)
    rope_dim = w.shape.rotary_dim
    mla = to_attnconv_mla(source, kv_rank=max_kv_rank(w.shape, rope_dim), rope_dim=rope_dim)
    ids = torch.randint(0, source.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    assert (_logits(mla, ids) - _logits(source, ids)).abs().max() <= 1e-4
    assert type(mla.model.layers[0].self_attn).__name__ == "MLAAttention"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_full_rank_fewer_pairs_is_lossless_without_rotation(tmp_path, family):
    """With every position 0 RoPE is the identity, so only the latent's NoPE keys, values, biases and norms
    are tested: at full rank they must reproduce the source."""
    source = _source(tmp_path, family, 2)
    w = from_hf_attention(source.model.layers[0].self_attn, source.config)
    mla = to_attnconv_mla(source, kv_rank=max_kv_rank(w.shape, 4), rope_dim=4, rope_select="uniform")
    ids = torch.randint(0, source.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    zeros = torch.zeros_like(ids)
    assert (_logits(mla, ids, position_ids=zeros) - _logits(source, ids, position_ids=zeros)).abs().max() <= 1e-4
    # and with positions it is not the source any more (the dropped pairs lost their rotation)
    assert (_logits(mla, ids) - _logits(source, ids)).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_low_rank_cache_size_and_incremental_decode(tmp_path, family):
    source = _source(tmp_path, family, 2)
    ranks = [24, 40]  # per layer
    mla = to_attnconv_mla(source, kv_rank=ranks, rope_dim=4, rope_select="high")
    w = from_hf_attention(source.model.layers[0].self_attn, source.config)
    ids = torch.randint(0, source.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(2))
    full = _logits(mla, ids)
    cache = DynamicCache(config=mla.config)
    with torch.no_grad():
        steps = [mla(input_ids=ids[:, :12], cache=cache, use_cache=True).logits]
        for t in range(12, 20):
            steps.append(mla(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-4
    k_norm = family == "qwen3"
    assert mla.config.kv_cache_dim_per_layer == sum(r + 2 * 4 + (2 if k_norm else 0) for r in ranks) / 2
    for i, layer in enumerate(cache.layers):
        keys, values = layer.keys, layer.values  # [b, n_kv, t, rope_dim], [b, 1, t, latent]
        assert keys.shape[2] == values.shape[2] == 20
        stored = keys.shape[1] * keys.shape[3] + values.shape[1] * values.shape[3]
        assert stored == cache_per_token(w.shape, ranks[i], 4, k_norm) == ranks[i] + 2 * 4 + (2 if k_norm else 0)


def test_trains(tmp_path):
    """Gradients reach every MLA parameter (uptraining starts from this model)."""
    mla = to_attnconv_mla(_source(tmp_path, "qwen3", 2), kv_rank=16, rope_dim=4).train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    mla(input_ids=ids, labels=ids).loss.backward()
    attn = mla.model.layers[0].self_attn
    for p in (attn.q_proj.weight, attn.k_rope_proj.weight, attn.kv_a_proj.weight, attn.kv_b_proj.weight,
              attn.k_norm.weight, attn.o_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_save_and_load_round_trip(tmp_path):
    source = _source(tmp_path, "qwen2", 2)
    mla = to_attnconv_mla(source, kv_rank=[20, 28], rope_dim=4, rope_select="low")
    mla.save_pretrained(tmp_path / "out")
    register_auto_classes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    assert loaded.config.model_type == "qwen2_mla" and loaded.config.kv_lora_rank == [20, 28]
    assert type(loaded).__name__ == "Qwen2MLAForCausalLM"
    ids = torch.randint(0, source.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    assert torch.equal(_logits(loaded, ids), _logits(mla, ids))


def test_svd_init_is_the_optimal_weight_factorisation(tmp_path):
    """init svd = MHA2MLA's SVD_joint: the latent's reconstruction of [W_k_nope; W_v] reaches Eckart-Young."""
    source = _source(tmp_path, "llama", 2)
    w = from_hf_attention(source.model.layers[1].self_attn, source.config)
    pairs = select_pairs("high", w.shape, 2)
    target, _, _ = latent_target(w, pairs)  # [n_kv * (2d - 4), hidden]
    rank = 20
    out = convert_attnconv_layer(w, kv_rank=rank, pairs=pairs, init="svd")
    error = torch.linalg.matrix_norm(out["kv_b_proj.weight"] @ out["kv_a_proj.weight"] - target)
    sv = torch.linalg.svdvals(target.double())
    assert error.item() == pytest.approx(sv[rank:].pow(2).sum().sqrt().item(), rel=1e-4)
    assert out["k_rope_proj.weight"].shape == (2 * 4, w.shape.hidden)
    assert out["kv_b_proj.weight"].shape == (2 * (2 * w.shape.head_dim - 4), rank)


def test_rotary_dim_of_partial_rotary(tmp_path):
    source = _source(tmp_path, "phi3", 4)
    assert rotary_dim_of(source.config) == source.config.hidden_size // source.config.num_attention_heads // 2


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3"])
def test_output_shapes_without_computing(tmp_path, family):
    source = _source(tmp_path, family, 2)
    w = from_hf_attention(source.model.layers[0].self_attn, source.config)
    pairs = select_pairs("low", w.shape, 2)
    out = convert_attnconv_layer(w, kv_rank=12, pairs=pairs)
    planned = attnconv_output_shapes(w.shape, kv_rank=12, rope_dim=4, q_bias=w.q_bias is not None,
                                     kv_bias=w.k_bias is not None, o_bias=w.o_bias is not None,
                                     qk_norm=w.k_norm is not None)
    assert {k: tuple(v.shape) for k, v in out.items()} == planned

"""attnconv's MLA format with one RoPE key shared by all heads (`--rope-key shared`, mla/attnconv_shared.py).

References: transformers' own DeepseekV3 model of the same conversion (DeepSeek's structure; its latent norm made
linear to 1e-6, so the two must agree to float32 rounding), the source model where the algebra is exact (an MQA
source keeping every RoPE pair at full rank), and the one-line refusals of what the layout cannot hold.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from attnconv.convert.api import convert
from attnconv.convert.attention_weights import from_hf_attention
from attnconv.convert.mla.attnconv_shared import convert_shared_layer, max_kv_rank, shared_output_shapes, shared_pairs
from attnconv.convert.mla.inmemory import collect_statistics, to_attnconv_mla, to_deepseek_v3
from attnconv.convert.settings import ConvertSettings
from attnconv.errors import AttnconvError
from attnconv.push.card import model_card
from attnconv.testing import build_tiny_model


def _source(tmp_path, family: str, n_kv: int):
    path = build_tiny_model(family, tmp_path / f"{family}-{n_kv}", n_heads=4, n_kv_heads=n_kv)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("init,phases", [("svd", False), ("pca", True)])
def test_equals_transformers_deepseek_v3_of_the_same_conversion(tmp_path, init, phases):
    """Same RoRoPE key, latent and phases as the deepseek-v3 format, without its latent norm and query rescale."""
    _, source = _source(tmp_path, "llama", 2)
    calibration = collect_statistics(source, torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(1)),
                                     phases=True, seq_len=128)
    ours = to_attnconv_mla(source, kv_rank=24, rope_dim=8, rope_key="shared", init=init, calibration=calibration,
                           phases=phases)
    deepseek, _ = to_deepseek_v3(source, kv_rank=24, rope_dim=8, init=init, calibration=calibration, phases=phases)
    a, b = _logits(ours, IDS), _logits(deepseek, IDS)
    assert (a - _logits(source, IDS)).abs().max() > 0.1  # lossy at this rank: the comparison below means something
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    assert ours.config.kv_cache_dim_per_layer == 24 + 8 and ours.config.num_key_value_heads == 4


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_mqa_source_with_every_pair_at_full_rank_is_lossless(tmp_path, family):
    """One KV head's key is its own shared RoPE key: the NoPE keys vanish and the latent holds the values (and
    Qwen2's biases)."""
    _, source = _source(tmp_path, family, 1)
    w = from_hf_attention(source.model.layers[0].self_attn, source.config)
    rope_dim = w.shape.rotary_dim
    mla = to_attnconv_mla(source, kv_rank=max_kv_rank(w.shape, rope_dim), rope_dim=rope_dim, rope_key="shared")
    assert (_logits(mla, IDS) - _logits(source, IDS)).abs().max() <= 1e-4


def test_output_shapes_and_pairs_without_computing(tmp_path):
    _, source = _source(tmp_path, "qwen2", 2)
    w = from_hf_attention(source.model.layers[0].self_attn, source.config)
    pairs = shared_pairs("uniform", w.shape, 2)
    assert pairs.shape == (1, 2)
    out = convert_shared_layer(w, kv_rank=12, pairs=pairs[0])
    planned = shared_output_shapes(w.shape, kv_rank=12, rope_dim=4, q_bias=True, kv_bias=True)
    assert {k: tuple(v.shape) for k, v in out.items()} == planned


def test_cli_conversion_round_trip_and_refusals(tmp_path, cli):
    path, source = _source(tmp_path, "qwen2", 2)
    out = tmp_path / "shared"
    convert(ConvertSettings(path, out, to="mla", format="attnconv", rope_key="shared", kv_rank=(20,), rope_dim=8,
                            init="svd", phases=False), progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = to_attnconv_mla(source, kv_rank=20, rope_dim=8, rope_key="shared")
    assert loaded.config.rope_key == "shared" and torch.equal(_logits(loaded, IDS), _logits(reference, IDS))
    assert json.loads((out / "attnconv.json").read_text())["conversion"]["rope_key"] == "shared"
    assert "one RoPE key of 8 dims shared by all heads" in model_card(out, "me/x")

    qwen3 = build_tiny_model("qwen3", tmp_path / "qwen3", n_heads=4, n_kv_heads=2)
    code, _, err = cli("convert", qwen3, tmp_path / "q3", "--to", "mla", "--format", "attnconv", "--rope-key",
                       "shared", "--kv-rank", "16", "--init", "svd", "--no-phases")
    assert code == 2 and "q_norm/k_norm" in err and "--rope-key per-kv-head" in err and "Traceback" not in err
    assert not (tmp_path / "q3").exists()
    code, _, err = cli("convert", path, tmp_path / "x", "--to", "mla", "--rope-key", "shared", "--kv-rank", "16")
    assert code == 2 and "--rope-key is for --format attnconv" in err
    with pytest.raises(AttnconvError, match="--kv-rank 200"):
        convert(ConvertSettings(path, tmp_path / "y", to="mla", format="attnconv", rope_key="shared",
                                kv_rank=(200,), init="svd", phases=False), progress=False)

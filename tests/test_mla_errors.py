"""Bad MLA requests are refused at the pure-function level with one-line AttnconvErrors that say what to do."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from attnconv.convert.attention_weights import from_hf_attention
from attnconv.convert.mla.attnconv_format import attnconv_config, convert_attnconv_layer
from attnconv.convert.mla.calibration import InputMoments
from attnconv.convert.mla.deepseek import convert_deepseek_layer, deepseek_config
from attnconv.convert.mla.rope import check_rope_dim, select_pairs
from attnconv.errors import AttnconvError
from attnconv.testing import build_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for family in ("llama", "qwen2", "qwen3"):
        path = build_tiny_model(family, tmp_path_factory.mktemp(family), n_heads=4, n_kv_heads=2)
        out[family] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return out


def _weights(model):
    return from_hf_attention(model.model.layers[0].self_attn, model.config)


def _refused(fn, *needles):
    with pytest.raises(AttnconvError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_rank_above_what_the_heads_hold(models):
    w = _weights(models["llama"])  # 2 KV heads of 16
    pairs = select_pairs("high", w.shape, 2)
    _refused(lambda: convert_attnconv_layer(w, kv_rank=2 * (32 - 4) + 1, pairs=pairs), "--kv-rank 57", "at most 56")
    _refused(lambda: convert_attnconv_layer(w, kv_rank=0, pairs=pairs), "--kv-rank must be >= 1")
    _refused(lambda: convert_deepseek_layer(w, kv_rank=2 * 2 * 16 - 8 + 1, rope_dim=8), "at most 56")
    _refused(lambda: convert_deepseek_layer(w, kv_rank=8, rope_dim=8, q_rank=10**4), "--q-rank")


@pytest.mark.parametrize("rope_dim,needle", [(3, "even"), (0, "even"), (18, "exceeds the 16 RoPE dims")])
def test_bad_rope_dims(models, rope_dim, needle):
    w = _weights(models["llama"])
    _refused(lambda: check_rope_dim(rope_dim, w.shape), f"--rope-dim {rope_dim}", needle)
    _refused(lambda: convert_deepseek_layer(w, kv_rank=8, rope_dim=rope_dim), needle)


def test_deepseek_refuses_what_it_cannot_express(models):
    _refused(lambda: convert_deepseek_layer(_weights(models["qwen2"]), kv_rank=8, rope_dim=8),
             "attention biases", "--format attnconv")
    _refused(lambda: convert_deepseek_layer(_weights(models["qwen3"]), kv_rank=8, rope_dim=8),
             "q_norm/k_norm", "--format attnconv")
    shape = _weights(models["llama"]).shape
    for family in ("qwen2", "qwen3"):
        _refused(lambda family=family: deepseek_config(models[family].config.to_dict(), shape, kv_rank=8, rope_dim=8),
                 "--format attnconv")
    llama31 = {**models["llama"].config.to_dict(), "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    _refused(lambda: deepseek_config(llama31, shape, kv_rank=8, rope_dim=8), "'llama3'", "--format attnconv")
    _refused(lambda: deepseek_config({**models["llama"].config.to_dict(), "mlp_bias": True}, shape, kv_rank=8,
                                     rope_dim=8), "MLPs have biases")
    _refused(lambda: convert_deepseek_layer(_weights(models["llama"]), kv_rank=8, rope_dim=8, rope_select="low"),
             "--rope-select low", "high or uniform")
    _refused(lambda: deepseek_config({"model_type": "gpt2"}, shape, kv_rank=8, rope_dim=8), "'gpt2'")


def test_missing_calibration_and_unknown_choices(models):
    w = _weights(models["llama"])
    pairs = select_pairs("high", w.shape, 2)
    _refused(lambda: convert_attnconv_layer(w, kv_rank=8, pairs=pairs, init="pca"), "--init pca needs")
    _refused(lambda: convert_deepseek_layer(w, kv_rank=8, rope_dim=8, init="pca"), "--init pca needs")
    _refused(lambda: convert_attnconv_layer(w, kv_rank=8, pairs=pairs, init="random"), "--init 'random'")
    _refused(lambda: select_pairs("2-norm", w.shape, 2), "2-norm needs calibration")
    _refused(lambda: select_pairs("best", w.shape, 2), "--rope-select 'best'")
    _refused(lambda: attnconv_config({"model_type": "gpt2"}, kv_ranks=[8], rope_dim=4, pairs=[pairs], init="svd"),
             "'gpt2'")
    # calibration moments are accepted for svd too (ignored: svd is weight-only)
    out = convert_attnconv_layer(w, kv_rank=8, pairs=pairs, init="svd", moments=InputMoments.identity(64))
    assert out["kv_a_proj.weight"].shape == (8, 64)


def test_deepseek_v3_is_never_written_in_float16(tmp_path):
    """Its latent projection is scaled below float16's range (the linear latent norm): a float16 source or
    --dtype float16 is refused before anything is written; bfloat16 works."""
    from attnconv.convert.api import convert
    from attnconv.convert.settings import ConvertSettings

    src = build_tiny_model("llama", tmp_path / "src", dtype=torch.float16, n_heads=4, n_kv_heads=2)
    for dtype in ("auto", "float16"):
        _refused(lambda d=dtype: convert(ConvertSettings(src, tmp_path / "out", to="mla", kv_rank=8, init="svd",
                                                         phases=False, dtype=d), progress=False),
                 "float16", "--dtype bfloat16")
        assert not (tmp_path / "out").exists()
    convert(ConvertSettings(src, tmp_path / "bf16", to="mla", kv_rank=8, init="svd", phases=False,
                            dtype="bfloat16"), progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    latent = model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight[:8]
    assert latent.abs().max() > 0 and torch.isfinite(latent).all()

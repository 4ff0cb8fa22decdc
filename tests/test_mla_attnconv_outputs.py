"""attnconv-format MLA outputs that earlier versions wrote but could not use: `--rope-select 2-norm` with
calibration (the shipped MHA2MLA recipe's setting) and a rank per layer (`--kv-rank R1,R2`), through every command."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import attnconv  # noqa: F401  (registers the attnconv MLA classes with transformers)
from attnconv.convert.api import convert
from attnconv.convert.settings import ConvertSettings
from attnconv.loading import load_causal_lm
from attnconv.recipes import load_recipe
from attnconv.testing import build_tiny_model

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("mla-out") / "llama", with_tokenizer=True, hidden=64,
                            n_heads=4, n_kv_heads=2, max_positions=128)


def test_the_mha2mla_recipe_settings_convert_a_tiny_llama(src, tmp_path):
    """2-norm pairs come from calibration; the config holds the pairs each layer chose (the recipe at tiny size)."""
    from attnconv.calibration import calibration_tokens
    from attnconv.convert.mla.inmemory import collect_statistics, layer_weights
    from attnconv.convert.mla.rope import select_pairs
    from attnconv.loading import load_tokenizer

    stage = next(s for s in load_recipe(RECIPES / "llama2-7b-mla-mha2mla.yaml").stages if s.command == "convert")
    assert (stage.settings.rope_select, stage.settings.format, stage.settings.init) == ("2-norm", "attnconv", "pca")
    settings = dataclasses.replace(stage.settings, source=str(src), out=str(tmp_path / "mla"), kv_rank=(24,),
                                   rope_dim=4, calibrate="tinyshakespeare:train", calib_tokens=512, calib_seq_len=64)
    convert(settings, progress=False)
    config = json.loads((tmp_path / "mla" / "config.json").read_text())
    record = json.loads((tmp_path / "mla" / "attnconv.json").read_text())["conversion"]
    assert config["dtype"] == "bfloat16" and record["rope_select"] == "2-norm"
    # the independent choice: top-2 pairs per KV head by the 2-norm score on the same tokens, model in memory
    model = load_causal_lm(src, dtype="float32")
    tokens = calibration_tokens("tinyshakespeare:train", load_tokenizer(src), 512, 64)
    stats = collect_statistics(model, tokens.flatten(), seq_len=64)
    want = [select_pairs("2-norm", w.shape, 2, st.pair_scores).tolist() for w, st in zip(layer_weights(model), stats,
                                                                                          strict=True)]
    assert config["rope_pairs"] == want and [record["rope_pairs"][str(i)] for i in range(2)] == want
    ids = tokens[:1, :24]
    with torch.no_grad():
        assert torch.isfinite(load_causal_lm(tmp_path / "mla")(ids).logits).all()


@pytest.fixture(scope="module")
def per_layer(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("per-layer") / "mla"
    convert(ConvertSettings(src, out, to="mla", format="attnconv", kv_rank=(24, 16), rope_dim=8, init="svd",
                            phases=False), progress=False)
    return out


def test_a_rank_per_layer_loads_as_transformers_and_the_in_memory_conversion_give(src, per_layer):
    from transformers import AutoModelForCausalLM

    from attnconv.convert.mla.inmemory import to_attnconv_mla

    config = json.loads((per_layer / "config.json").read_text())
    assert config["kv_lora_rank"] == [24, 16] and config["kv_cache_dim_per_layer"] == (24 + 16 + 16 + 16) / 2
    ids = torch.randint(0, 50257, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = load_causal_lm(per_layer, dtype="float32")(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(per_layer, dtype=torch.float32)(ids).logits
        memory = to_attnconv_mla(load_causal_lm(src, dtype="float32"), kv_rank=[24, 16], rope_dim=8)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    torch.testing.assert_close(ours, memory, atol=1e-5, rtol=0)


def test_a_rank_per_layer_goes_through_info_and_eval(per_layer, src, tmp_path, cli):
    code, out, err = cli("info", per_layer, "--context", "100")
    assert code == 0, err
    # 2 layers caching 24 + 16 and 16 + 16 values (latent + 2 KV heads x 8 RoPE dims), bfloat16, 100 tokens
    assert f"{(24 + 16 + 16 + 16) * 2 * 100 / 1024:.2f} KiB" in out
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question. " * 8)  # a few windows suffice
    code, _, err = cli("eval", per_layer, "--reference", src, "--data", tmp_path / "text.txt", "-L", "32",
                       "--out", tmp_path / "report", "--quiet")
    assert code == 0, err
    rows = json.loads((tmp_path / "report" / "results.json").read_text())["models"]
    assert rows[1]["kv_bytes_per_token"] == (24 + 16 + 16 + 16) * 4 and rows[1]["kl"] > 0

"""Serving engines' limits (attnconv/engines.py) and the query path llama.cpp needs.

The exact query latent (q_rank = hidden, the input RMSNorm folded into the projections) is checked against the
q_rank=None conversion's logits, in memory and through the streamed CLI; the configs attnconv writes are checked
against every engine record; bad --engine requests are refused in one line before anything is written. That the
engines really run these outputs: tests/test_engines_llamacpp.py (`make test-engines`).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from attnconv.convert.attention_weights import AttentionShape
from attnconv.convert.mla.deepseek import deepseek_config, exact_query_latent, fold_input_norm
from attnconv.convert.mla.inmemory import to_deepseek_v3
from attnconv.engines import ENGINES, engine, engines_loading, engines_serving
from attnconv.loading import load_causal_lm
from attnconv.push.card import model_card
from attnconv.testing import assert_one_line_error, build_tiny_model

# SmolLM2-135M's attention (9 heads, 3 KV heads of 64, hidden 576, 30 layers) and a Llama-3-8B-like one.
SMOL = ({"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
         "num_hidden_layers": 30, "rms_norm_eps": 1e-5}, AttentionShape(9, 3, 64, 576, 64, 64 ** -0.5))
LLAMA8B = ({"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32}, AttentionShape(32, 8, 128, 4096, 128, 128 ** -0.5))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    return root, build_tiny_model("llama", root / "llama", with_tokenizer=True, n_heads=4, n_kv_heads=2,
                                  max_positions=128)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(vocab: int, seed: int):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", ["llama", "gemma"])  # gemma: its norm applies 1 + w
def test_exact_query_latent_reproduces_the_plain_query(tmp_path, family):
    path = build_tiny_model(family, tmp_path / family, n_heads=4, n_kv_heads=2)
    source = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    plain, _ = to_deepseek_v3(source, kv_rank=24, rope_dim=8)
    latent, _ = to_deepseek_v3(source, kv_rank=24, rope_dim=8, q_rank=source.config.hidden_size)
    attn = latent.model.layers[0].self_attn
    assert torch.equal(attn.q_a_proj.weight, torch.eye(64)) and torch.equal(attn.q_a_layernorm.weight, torch.ones(64))
    assert torch.equal(latent.model.layers[1].input_layernorm.weight, torch.ones(64))
    ids = _ids(source.config.vocab_size, 0)
    ref = _logits(plain, ids)
    assert (_logits(latent, ids) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_fold_is_exact_and_leaves_other_tensors_alone():
    g = torch.Generator().manual_seed(0)
    x, norm = torch.randn(5, 8, generator=g), torch.rand(8, generator=g) + 0.5
    w = {"kv_a_proj_with_mqa.weight": torch.randn(6, 8, generator=g), "kv_b_proj.weight": torch.randn(4, 3)}
    folded = fold_input_norm(w, norm)
    assert torch.allclose((x / norm) @ folded["kv_a_proj_with_mqa.weight"].T, x @ w["kv_a_proj_with_mqa.weight"].T,
                          atol=1e-5)
    assert folded["kv_b_proj.weight"] is w["kv_b_proj.weight"]
    q = exact_query_latent(torch.randn(12, 8, generator=g))
    assert q["q_b_proj.weight"].shape == (12, 8) and torch.equal(q["q_a_proj.weight"], torch.eye(8))


def test_written_configs_pass_the_records_of_the_engines_they_claim():
    config, _ = deepseek_config(*SMOL, kv_rank=256, rope_dim=64, q_rank=576)
    assert engines_loading(config) == ["transformers", "llama.cpp", "vllm"]
    assert "kv_lora_rank + " not in " ".join(ENGINES["vllm"].config_problems(config))
    assert ENGINES["sglang"].config_problems(config) == [ENGINES["sglang"].setting_problem(256, 64, 64)]
    config, _ = deepseek_config(*LLAMA8B, kv_rank=512, rope_dim=64, q_rank=4096)
    assert engines_loading(config) == list(ENGINES)
    config, _ = deepseek_config(*SMOL, kv_rank=96, rope_dim=32)  # no query latent: llama.cpp refuses 30 layers
    assert engines_loading(config) == ["transformers"]
    assert "q_lora_rank" in ENGINES["llama.cpp"].config_problems(config)[0]


def test_records_say_which_engines_serve_a_setting():
    assert engines_serving(96, 32) == ["transformers", "llama.cpp"]
    assert engines_serving(256, 64) == ["transformers", "llama.cpp", "vllm"]
    assert engines_serving(512, 64) == list(ENGINES)
    llamacpp = engine("llama.cpp")
    assert llamacpp.default_q_rank(576, 30) == 576 and llamacpp.default_q_rank(2048, 27) is None
    assert llamacpp.q_rank_problem(2048, 27) is not None and llamacpp.q_rank_problem(None, 26) is None


def _same_logits(a, b, vocab: int):
    ids = _ids(vocab, 1)
    ref = _logits(load_causal_lm(a, dtype="float32"), ids)
    out = _logits(load_causal_lm(b, dtype="float32"), ids)  # stock transformers DeepseekV3
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


MLA = ["--to", "mla", "--kv-rank", "24", "--rope-dim", "8", "--init", "svd", "--no-phases"]


def test_streamed_fold_of_gemma_norms(tmp_path, cli):
    """The CLI folds the norm as Gemma applies it (1 + w)."""
    src = build_tiny_model("gemma", tmp_path / "gemma", n_heads=4, n_kv_heads=2, with_tokenizer=True)
    assert cli("convert", src, tmp_path / "plain", *MLA)[0] == 0
    assert cli("convert", src, tmp_path / "latent", *MLA, "--q-rank", "64")[0] == 0
    _same_logits(tmp_path / "plain", tmp_path / "latent", 256)


def test_engine_llamacpp_writes_the_exact_query_latent(tiny, tmp_path, cli):
    root, src = tiny
    assert cli("convert", src, tmp_path / "plain", *MLA)[0] == 0
    code, _, err = cli("convert", src, tmp_path / "cpp", *MLA, "--engine", "llama.cpp")
    assert code == 0, err
    config = json.loads((tmp_path / "cpp" / "config.json").read_text())
    assert config["q_lora_rank"] == 64 and config["n_routed_experts"] > config["n_group"]
    conv = json.loads((tmp_path / "cpp" / "attnconv.json").read_text())["conversion"]
    assert conv["engine"] == "llama.cpp" and "llama.cpp" in conv["engines"] and conv["input_norm_folded"]
    assert "Made for `llama.cpp`; within the limits of: `transformers`, `llama.cpp`" in model_card(tmp_path / "cpp",
                                                                                                 "me/tiny-mla")
    _same_logits(tmp_path / "plain", tmp_path / "cpp", config["vocab_size"])


@pytest.mark.parametrize("args,needles", [
    (["--engine", "vllm", "--kv-rank", "96", "--rope-dim", "32"], ["vllm", "320 or 576", "--kv-rank 288"]),
    (["--engine", "sglang", "--kv-rank", "24", "--rope-dim", "8"], ["--kv-rank 512 --rope-dim 64"]),
    (["--engine", "vllm", "--kv-rank", "24"], ["320 or 576"]),  # rope dim from the model: checked once read
    (["--engine", "llama.cpp", "--kv-rank", "24", "--rope-dim", "8", "--format", "attnconv"], ["--format"]),
    (["--engine", "llama.cpp", "--kv-rank", "24", "--rope-dim", "8", "--q-rank", "65"], ["at most 64"]),
    (["--engine", "tgi", "--kv-rank", "24"], ["transformers", "llama.cpp", "vllm", "sglang"]),
])
def test_settings_an_engine_cannot_serve_are_refused_before_work(tiny, tmp_path, cli, args, needles):
    code, _, err = cli("convert", tiny[1], tmp_path / "out", "--to", "mla", *args)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_a_model_the_engine_cannot_express_is_refused_before_calibration(tmp_path, cli):
    src = build_tiny_model("gemma", tmp_path / "gemma", n_heads=4, n_kv_heads=2, with_tokenizer=True)  # GeGLU
    code, _, err = cli("convert", src, tmp_path / "out", "--to", "mla", "--kv-rank", "24", "--rope-dim", "8",
                       "--engine", "llama.cpp", "--init", "pca")  # pca calibrates: the refusal comes first
    assert_one_line_error(code, err, "llama.cpp", "silu", "gelu")
    assert not (tmp_path / "out").exists()


def test_info_names_the_engines_that_serve_a_setting(tiny, cli):
    code, out, _ = cli("info", tiny[1], "--kv-rank", "24", "--rope-dim", "8")
    assert code == 0 and "served by: transformers, llama.cpp" in " ".join(out.split())

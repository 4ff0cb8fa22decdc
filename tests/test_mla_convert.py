"""`attnconv convert --to mla`, streamed: the same models as the in-memory composition of the MLA functions,
lossless at full rank in attnconv format for every family, loadable where promised, and safe on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import attnconv  # noqa: F401  (registers the attnconv MLA classes with transformers)
from attnconv.convert.api import convert
from attnconv.convert.settings import ConvertSettings
from attnconv.errors import AttnconvError
from attnconv.loading import load_causal_lm, load_tokenizer
from attnconv.testing import FAMILIES, assert_one_line_error, build_tiny_model

LLAMA_LIKE = [f for f in FAMILIES if f != "gpt2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mla-convert")
    return root, build_tiny_model("llama", root / "llama", with_tokenizer=True, hidden=64, n_heads=4, n_kv_heads=2,
                                  max_positions=128)


def _logits(path, ids):
    with torch.no_grad():
        return load_causal_lm(path, dtype="float32")(ids).logits


@pytest.mark.parametrize("family", LLAMA_LIKE)
@pytest.mark.parametrize("n_kv", [4, 2])
def test_attnconv_format_at_full_rank_reproduces_every_family(tmp_path, family, n_kv):
    extra = {"extra": {"partial_rotary_factor": 0.5}} if family == "phi3" else {}
    src = build_tiny_model(family, tmp_path / "src", n_heads=4, n_kv_heads=n_kv, **extra)
    config = json.loads((src / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rotary = int(head_dim * (0.5 if family == "phi3" else 1.0))
    full = n_kv * (2 * head_dim - rotary)  # every NoPE key dim and every value dim of every KV head
    convert(ConvertSettings(src, tmp_path / "mla", to="mla", format="attnconv", kv_rank=full, rope_dim=rotary,
                            init="svd", phases=False), progress=False)
    ids = torch.randint(0, 256, (2, 17))
    torch.testing.assert_close(_logits(tmp_path / "mla", ids), _logits(src, ids), atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "mla" / "config.json").read_text())["model_type"] == f"{family}_mla"


@pytest.mark.parametrize("fmt, rope_dim", [("deepseek-v3", 8), ("attnconv", 4)])
def test_streamed_conversion_equals_the_in_memory_composition(tiny, tmp_path, fmt, rope_dim):
    """The plan converts layer by layer from the files, calibrating as it reaches each layer; the result is the
    model the pure functions give from the whole model in memory with the same calibration tokens."""
    from attnconv.calibration import calibration_tokens
    from attnconv.convert.mla.inmemory import collect_statistics, to_attnconv_mla, to_deepseek_v3

    root, src = tiny
    tokens = calibration_tokens("tinyshakespeare:train", load_tokenizer(src), 1024, 64)
    model = load_causal_lm(src, dtype="float32")
    stats = collect_statistics(model, tokens.flatten(), phases=True, seq_len=64)
    common = dict(kv_rank=24, rope_dim=rope_dim, init="pca", calibration=stats, phases=True)
    mem = to_deepseek_v3(model, **common)[0] if fmt == "deepseek-v3" else to_attnconv_mla(model, **common)
    plan = convert(ConvertSettings(src, tmp_path / "out", to="mla", format=fmt, kv_rank=24, rope_dim=rope_dim,
                                   calibrate="tinyshakespeare:train", calib_tokens=1024, calib_seq_len=64),
                   progress=False)
    ids = tokens[:2, :40]
    with torch.no_grad():
        torch.testing.assert_close(_logits(tmp_path / "out", ids), mem(ids).logits, atol=1e-5, rtol=0)
    record = json.loads((tmp_path / "out" / "attnconv.json").read_text())["conversion"]
    assert record["to"] == "mla" and record["format"] == fmt and record["calibration"]["tokens"] == 1024
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:  # what the plan said is what was written
        assert {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()} == {s.output: s.shape for s in plan.steps}
    values = (24 + rope_dim) if fmt == "deepseek-v3" else (24 + 2 * rope_dim)  # 2 KV heads keep RoPE dims each
    assert record["kv_bytes_per_token_after"] == 2 * values * 4  # 2 layers, float32


def test_deepseek_v3_output_is_a_stock_transformers_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, DeepseekV3ForCausalLM

    root, src = tiny
    convert(ConvertSettings(src, tmp_path / "ds", to="mla", kv_rank=16, rope_dim=8, init="svd", phases=False),
            progress=False)
    config = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["rope_interleave"] is True
    assert config["first_k_dense_replace"] == config["num_hidden_layers"] and config["q_lora_rank"] is None
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ds", trust_remote_code=False)
    assert type(model) is DeepseekV3ForCausalLM
    assert load_tokenizer(tmp_path / "ds") is not None


def test_dry_run_states_the_shapes_and_cache_and_writes_nothing(cli, tiny, tmp_path):
    root, src = tiny
    code, out, err = cli("convert", src, tmp_path / "x", "--to", "mla", "--kv-rank", "16", "--rope-dim", "8",
                         "--dry-run")
    assert code == 0, err
    assert "kv_a_proj_with_mqa.weight" in out and "24x64" in out.replace(" ", "") and not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, needle", [
    (["--to", "mla"], "--to mla needs --kv-rank"),
    (["--to", "mla", "--kv-rank", "1000"], "--kv-rank 1000"),
    (["--to", "mla", "--kv-rank", "16", "--rope-dim", "7"], "--rope-dim must be an even number"),
    (["--to", "mla", "--kv-rank", "16", "--rope-dim", "64"], "--rope-dim"),
    (["--to", "mla", "--kv-rank", "16", "--kv-heads", "2"], "then the latent) needs --format attnconv"),
    (["--to", "gqa", "--kv-heads", "2", "--kv-rank", "16"], "--kv-rank is for --to mla"),
    (["--to", "mla", "--kv-rank", "16,16,16"], "a rank per layer"),
    (["--to", "mla", "--kv-rank", "16", "--rope-select", "2-norm"], "use high or uniform"),
    (["--to", "mla", "--kv-rank", "16", "--calibrate", "TEXT", "--calib-tokens", "100000"], "tokens"),
])
def test_bad_mla_requests_are_one_line_and_write_nothing(cli, tiny, tmp_path, args, needle):
    root, src = tiny
    (tmp_path / "short.txt").write_text("To be, or not to be. " * 20)
    args = [str(tmp_path / "short.txt") if a == "TEXT" else a for a in args]
    code, _, err = cli("convert", src, tmp_path / "out", *args)
    assert_one_line_error(code, err, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_a_kv_rank_above_the_lossless_rank_is_refused_by_the_plan(cli, tiny, tmp_path):
    """Before any calibration (by default 131,072 tokens through the whole model): the dry run refuses it."""
    root, src = tiny
    for args in (["--kv-rank", "1000"], ["--format", "attnconv", "--kv-rank", "16,1000"]):
        code, _, err = cli("convert", src, tmp_path / "x", "--to", "mla", *args, "--dry-run")
        assert_one_line_error(code, err, "--kv-rank 1000 exceeds the 48 ")


@pytest.mark.parametrize("family, needle", [("gpt2", "learned positions"), ("qwen2", "--format attnconv"),
                                            ("qwen3", "--format attnconv")])
def test_what_a_format_cannot_express_is_refused_with_the_way_out(tmp_path, family, needle):
    src = build_tiny_model(family, tmp_path / "src", n_heads=4)
    with pytest.raises(AttnconvError, match=needle):
        convert(ConvertSettings(src, tmp_path / "out", to="mla", kv_rank=8, rope_dim=4), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["deepseek-v3", "attnconv"])
def test_both_formats_go_through_uptrain_eval_and_push(tiny, tmp_path, cli, fmt):
    """Distilled from the MHA source, scored against it, and described by the model card with how to load it."""
    root, src = tiny
    (tmp_path / "train.txt").write_text("To be, or not to be, that is the question. " * 300)
    mla = tmp_path / "mla"
    convert(ConvertSettings(src, mla, to="mla", format=fmt, kv_rank=16, rope_dim=8 if fmt == "deepseek-v3" else 4,
                            init="svd", phases=False), progress=False)
    code, _, err = cli("uptrain", mla, tmp_path / "up", "--data", tmp_path / "train.txt", "--steps", "2",
                       "--seq-len", "32", "--batch-size", "2", "--teacher", src, "--quiet")
    assert code == 0, err
    (tmp_path / "eval.txt").write_text("To be, or not to be, that is the question. " * 8)  # a few windows suffice
    code, out, err = cli("eval", mla, tmp_path / "up", "--reference", src, "--data", tmp_path / "eval.txt",
                         "-L", "32", "--out", tmp_path / "report", "--quiet")
    assert code == 0, err
    rows = json.loads((tmp_path / "report" / "results.json").read_text())["models"]
    assert [r["kl"] > 0 for r in rows[1:]] == [True, True]
    expected_bytes = 2 * (16 + (8 if fmt == "deepseek-v3" else 2 * 4)) * 4
    assert [r["kv_bytes_per_token"] for r in rows[1:]] == [expected_bytes, expected_bytes]
    code, out, err = cli("push", tmp_path / "up", "me/tiny-mla", "--dry-run")
    assert code == 0, err
    assert f"in the `{fmt}` format: a latent of 16 values" in out and "## Uptraining" in out
    assert ("import attnconv" in out) == (fmt == "attnconv")


def test_deepseek_v3_uptrains_on_cpu_at_a_length_of_blocked_attention(tmp_path, cli):
    """Query/key heads of 32 (NoPE + RoPE), value heads of 16: the blocked CPU attention takes both sizes."""
    from attnconv.kernels.causal_attention import BLOCKED_LENGTHS

    src = build_tiny_model("llama", tmp_path / "src", with_tokenizer=True, hidden=32, n_heads=2, layers=1,
                           max_positions=512)
    convert(ConvertSettings(src, tmp_path / "ds", to="mla", kv_rank=8, init="svd", phases=False), progress=False)
    config = json.loads((tmp_path / "ds" / "config.json").read_text())
    assert config["qk_nope_head_dim"] + config["qk_rope_head_dim"] != config["v_head_dim"]
    (tmp_path / "train.txt").write_text("To be, or not to be, that is the question. " * 60)
    code, _, err = cli("uptrain", tmp_path / "ds", tmp_path / "up", "--data", tmp_path / "train.txt", "--steps", "1",
                       "--seq-len", BLOCKED_LENGTHS.start, "--batch-size", "1", "--quiet")
    assert code == 0, err
    loss = json.loads((tmp_path / "up" / "train_log.jsonl").read_text().splitlines()[0])["loss"]
    assert torch.isfinite(torch.tensor(loss)) and not list(tmp_path.glob("*.uptrain-run"))

"""`attnconv convert --to gqa|mqa --method grouped|aligned|fit` through the CLI: lossless where an exact answer
exists (KV heads equal within each group, possibly shuffled), the same tensors as the in-memory functions
(gqa/calibrated.py) on the same calibration statistics, loadable by transformers, recorded, and safe on bad input."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from attnconv.convert.api import convert
from attnconv.convert.gqa.calibrated import convert_layer
from attnconv.convert.gqa.calibration import attended_collectors
from attnconv.convert.gqa.state_dict import attention_layers, with_attention_layers
from attnconv.convert.settings import ConvertSettings
from attnconv.families import ROPE_FAMILIES
from attnconv.reference import REFERENCE_DIR
from attnconv.testing import assert_one_line_error, build_tiny_model

CALIB = ["--calibrate", "tinyshakespeare:train", "--calib-tokens", "512", "--calib-seq-len", "64"]
IDS = torch.randint(0, 4096, (2, 19), generator=torch.Generator().manual_seed(0))

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def with_tokenizer(path):
    """The reference model's 4096-token tokenizer beside a tiny model (vocab 4096): calibration text tokenises."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REFERENCE_DIR / name, path / name)
    return path


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def logits(path):
    with torch.no_grad():
        return load(path)(IDS).logits


def tiny(family, path, seed=0, **kw):
    kw = {"n_heads": 8, "hidden": 64, **kw}
    return with_tokenizer(build_tiny_model(family, path, seed=seed, vocab=4096, max_positions=128, **kw))


def equal_heads(family, path, group, perm=None):
    """A tiny source whose KV heads are equal within each contiguous group of GROUP (k/v weights and biases),
    then reordered by PERM (KV head p := head perm[p], with its query heads and o_proj columns: the function
    is unchanged). Merging its groups loses nothing, but only once they are found when PERM shuffles them."""
    model = load(tiny(family, path.parent / f"{path.name}-raw"))
    sd, layers = model.state_dict(), []
    for layer in attention_layers(sd, model.config):
        n, d, g = layer.n_kv_heads, layer.head_dim, layer.n_heads // layer.n_kv_heads
        kv = [p - p % group for p in (perm or range(n))]
        q = [j * g + i for j in (perm or range(n)) for i in range(g)]

        def pick(t, idx, n_heads, d=d):
            return None if t is None else t.reshape(n_heads, d, *t.shape[1:])[idx].reshape(t.shape)

        o = layer.o.reshape(layer.hidden, layer.n_heads, d)[:, q].reshape(layer.o.shape)
        layers.append(replace(layer, q=pick(layer.q, q, layer.n_heads), k=pick(layer.k, kv, n),
                              v=pick(layer.v, kv, n), o=o, q_bias=pick(layer.q_bias, q, layer.n_heads),
                              k_bias=pick(layer.k_bias, kv, n), v_bias=pick(layer.v_bias, kv, n)))
    model.load_state_dict(with_attention_layers(sd, layers))
    model.save_pretrained(path)
    return with_tokenizer(path)


@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_equal_heads_convert_losslessly_through_the_cli(cli, tmp_path, family):
    src = equal_heads(family, tmp_path / "src", group=4)
    want = logits(src)
    for method in ("grouped", "aligned", "fit", "grouped+aligned+fit"):
        out = tmp_path / method
        code, _, err = cli("convert", src, out, "--to", "gqa", "--kv-heads", "2", "--method", method, *CALIB)
        assert code == 0, err
        assert (logits(out) - want).abs().max().item() <= 1e-5, method
        assert load(out).config.num_key_value_heads == 2


def test_mqa_and_a_gqa_source(cli, tmp_path):
    """MQA from 8 equal heads; GQA-2 from a GQA-4 source whose pairs of KV heads are equal."""
    src = equal_heads("qwen2", tmp_path / "mha", group=8)
    code, _, err = cli("convert", src, tmp_path / "mqa", "--to", "mqa", "--method", "grouped+aligned+fit", *CALIB)
    assert code == 0, err
    assert (logits(tmp_path / "mqa") - logits(src)).abs().max().item() <= 1e-5
    assert load(tmp_path / "mqa").config.num_key_value_heads == 1
    gqa = tmp_path / "gqa4-raw"
    model = load(tiny("llama", gqa, n_kv_heads=4))
    sd = model.state_dict()
    for name, t in sd.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            t[8:16] = t[:8]  # KV heads 0 and 1 equal, 2 and 3 equal (head_dim 8)
            t[24:32] = t[16:24]
    model.load_state_dict(sd)
    model.save_pretrained(tmp_path / "gqa4")
    src = with_tokenizer(tmp_path / "gqa4")
    code, _, err = cli("convert", src, tmp_path / "gqa2", "--kv-heads", "2", "--method", "fit", *CALIB)
    assert code == 0, err
    assert (logits(tmp_path / "gqa2") - logits(src)).abs().max().item() <= 1e-5


def test_grouped_unshuffles_shuffled_heads_through_the_cli(cli, tmp_path):
    perm = [0, 4, 1, 5, 2, 6, 3, 7]  # equal pairs {0,1},{2,3},{4,5},{6,7} land on {0,2},{4,6},{1,3},{5,7}
    src = equal_heads("llama", tmp_path / "src", group=2, perm=perm)
    code, _, err = cli("convert", src, tmp_path / "grouped", "--kv-heads", "4", "--method", "grouped", *CALIB)
    assert code == 0, err
    assert (logits(tmp_path / "grouped") - logits(src)).abs().max().item() <= 1e-5
    record = json.loads((tmp_path / "grouped" / "attnconv.json").read_text())["conversion"]
    for layer in record["layers"].values():
        assert sorted(map(sorted, layer["groups"])) == [[0, 2], [1, 3], [4, 6], [5, 7]]
        assert layer["grouping"]["cost_chosen"] < 1e-9 < layer["grouping"]["cost_contiguous"]
    code, _, err = cli("convert", src, tmp_path / "mean", "--kv-heads", "4", "--method", "mean")
    assert code == 0, err
    assert (logits(tmp_path / "mean") - logits(src)).abs().max().item() > 1e-2


@pytest.mark.parametrize("family", ["qwen2", "phi3"])  # q/k/v biases; a fused qkv_proj
def test_streamed_conversion_equals_the_in_memory_functions(tmp_path, family):
    """The plan reads each layer from the files and calibrates as it reaches it; the tensors written are exactly
    those convert_layer gives for the whole model in memory, on the same calibration run's statistics."""
    from attnconv.calibration import calibrate_layers, calibration_tokens
    from attnconv.loading import load_tokenizer

    src = tiny(family, tmp_path / "src", seed=3, max_shard_size="200KB")  # several shards; layers may straddle
    plan = convert(ConvertSettings(src, tmp_path / "out", kv_heads=2, method="grouped+aligned+fit", seed=5,
                                   calibrate="tinyshakespeare:train", calib_tokens=512, calib_seq_len=64),
                   progress=False)
    model = load(src)
    tokens = calibration_tokens("tinyshakespeare:train", load_tokenizer(src), 512, 64)
    collectors = attended_collectors(model)
    stats = [c[0].result() for _, c in calibrate_layers(src, tokens, lambda i: [collectors[i]], progress=False)]
    layers = [convert_layer(layer, s, 2, "grouped+aligned+fit", attended_moment=a, seed=5)[0]
              for layer, (s, a) in zip(attention_layers(model.state_dict(), model.config), stats, strict=True)]
    want = with_attention_layers(model.state_dict(), layers)
    got = {}
    for f in sorted((tmp_path / "out").glob("*.safetensors")):
        got.update(load_file(f))
    assert len({s.shard for s in plan.steps}) > 1
    assert set(got) == {n for n in want if not n.endswith("rotary_emb.inv_freq")}
    for name, t in got.items():
        assert torch.equal(t, want[name]), name
    for f in (tmp_path / "out").glob("*.safetensors"):  # the plan's shapes are what was written
        with safe_open(f, "pt") as h:
            for n in h.keys():
                assert tuple(h.get_slice(n).get_shape()) == next(s.shape for s in plan.steps if s.output == n)


def test_records_say_every_choice_and_a_seed_reproduces_the_files(tmp_path):
    src = tiny("qwen3", tmp_path / "src", n_heads=4)  # 4 KV heads: 3 groupings to search, not 35 (20x faster)
    outs = []
    for run in ("a", "b"):
        convert(ConvertSettings(src, tmp_path / run, kv_heads=2, method="fit+grouped+aligned", seed=1,
                                calibrate="tinyshakespeare:train", calib_tokens=512, calib_seq_len=64),
                progress=False)
        outs.append((tmp_path / run / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    record = json.loads((tmp_path / "a" / "attnconv.json").read_text())["conversion"]
    assert record["to"] == "gqa" and record["method"] == "grouped+aligned+fit" and record["seed"] == 1
    assert record["calibration"] == {"data": "tinyshakespeare:train", "tokens": 512, "seq_len": 64}
    assert record["kv_bytes_per_token_after"] * 2 == record["kv_bytes_per_token_before"]
    assert sorted(record["layers"]) == ["0", "1"]
    for layer in record["layers"].values():
        assert sorted(j for g in layer["groups"] for j in g) == list(range(4)) and len(layer["groups"]) == 2
        assert len(layer["alignment"]["key_angle_abs_mean"]) == 4 and len(layer["alignment"]["value_maps"]) == 4
        objective = layer["objective"]
        assert objective["final"]["keys"] <= objective["mean"]["keys"] * (1 + 1e-9)
        assert objective["final"]["values"] <= objective["mean"]["values"] * (1 + 1e-9)
    from attnconv.push.card import model_card

    card = " ".join(model_card(tmp_path / "a", "me/tiny-gqa").split())
    assert "**4 -> 2 key/value heads** (GQA), by the `grouped+aligned+fit` method (group KV heads" in card
    assert "calibrated on 512 tokens of `tinyshakespeare:train`" in card


def test_dry_run_states_calibration_and_memory_and_writes_nothing(cli, tmp_path):
    src = tiny("llama", tmp_path / "src")
    code, out, err = cli("convert", src, tmp_path / "x", "--kv-heads", "2", "--method", "grouped+fit", "--dry-run")
    assert code == 0, err
    text = " ".join(out.split())
    assert "(grouped+fit, calibrated)" in text
    assert "calibration: 131,072 tokens of wikitext-2-test:calib (the default" in text
    assert "beside the conversion" in text and "16x64" in text.replace(" ", "")  # k_proj: 2 heads of 8
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args, needle", [
    (["--method", "pca"], "--method 'pca' is not a method"),
    (["--method", "mean+fit"], "only the calibrated methods combine"),
    (["--method", "grouped+grouped"], "is not a method"),
    (["--method", "fit", "--calibrate", "MISSING"], "MISSING"),
    (["--method", "fit", "--calibrate", "TEXT", "--calib-tokens", "100000"], "fewer than the"),
])
def test_bad_requests_are_one_line_and_write_nothing(cli, tmp_path, args, needle):
    src = tiny("llama", tmp_path / "src")
    (tmp_path / "short.txt").write_text("To be, or not to be. " * 20)
    args = [str(tmp_path / "short.txt") if a == "TEXT" else str(tmp_path / "nowhere.txt") if a == "MISSING" else a
            for a in args]
    code, _, err = cli("convert", src, tmp_path / "out", "--kv-heads", "2", *args)
    assert_one_line_error(code, err, needle.replace("MISSING", "nowhere.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt", "src"]


@pytest.mark.parametrize("family, method, needle", [
    ("gpt2", "grouped", "learned positions"),
    ("phi3", "aligned", "partial rotary"),
])
def test_what_a_method_cannot_do_is_refused_with_the_way_out(cli, tmp_path, family, method, needle):
    extra = {"extra": {"partial_rotary_factor": 0.5}} if family == "phi3" else {}
    src = build_tiny_model(family, tmp_path / "src", n_heads=4, **extra)
    code, _, err = cli("convert", src, tmp_path / "out", "--to", "mqa", "--method", method)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_mla_from_merged_kv_heads_is_that_gqa_at_its_bytes(cli, tmp_path):
    """--to mla --format attnconv --kv-heads 2 --method M: the latent of the GQA-2 that --to gqa --method M
    writes; at that GQA's bytes (latent 2 x 8 + 2 x 8 RoPE dims) it is that GQA exactly (same calibration)."""
    src = tiny("llama", tmp_path / "src")
    method = ["--method", "grouped+aligned+fit", "--kv-heads", "2", *CALIB]
    code, _, err = cli("convert", src, tmp_path / "gqa", "--to", "gqa", *method)
    assert code == 0, err
    code, _, err = cli("convert", src, tmp_path / "mla", "--to", "mla", "--format", "attnconv", "--kv-rank", "16",
                       "--rope-dim", "8", *method)
    assert code == 0, err
    torch.testing.assert_close(logits(tmp_path / "mla"), logits(tmp_path / "gqa"), rtol=1e-4, atol=1e-4)
    config = json.loads((tmp_path / "mla" / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["kv_cache_dim_per_layer"] == 32
    record = json.loads((tmp_path / "mla" / "attnconv.json").read_text())["conversion"]
    assert record["kv_heads"] == 2 and record["method"] == "grouped+aligned+fit" and record["phases"] is False
    code, _, err = cli("convert", src, tmp_path / "x", "--to", "mla", "--kv-rank", "16", *method)
    assert code != 0 and "needs --format attnconv" in err and "\n" not in err.strip()


def test_svd_says_it_reads_calibration_text_for_phases_only(cli, tmp_path):
    """--init svd is weights-only with --no-phases; with --phases (the default) the dry run says that the
    calibration text is read, how much, and for which option."""
    src = tiny("llama", tmp_path / "src")
    mla = ["--to", "mla", "--format", "attnconv", "--kv-rank", "16", "--init", "svd", "--dry-run"]
    code, out, err = cli("convert", src, tmp_path / "x", *mla, "--calib-tokens", "4096")
    assert code == 0, err
    assert "calibration: 4,096 tokens of wikitext-2-test:calib (the default; --calibrate DATA to choose) in " \
           "sequences of 128, for --phases," in " ".join(out.split())
    code, out, err = cli("convert", src, tmp_path / "x", *mla, "--no-phases")
    assert code == 0 and "calibration" not in out, err

"""`attnconv eval` end to end: reports, --reference, --decode (decode benchmark stubbed), and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import types

import pytest
from typer.testing import CliRunner

from attnconv.cli import app
from attnconv.errors import AttnconvError
from attnconv.testing import build_tiny_model
from attnconv.textdata import tinyshakespeare_split

runner = CliRunner()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    mha = build_tiny_model("llama", root / "mha", with_tokenizer=True, hidden=32, n_heads=4)
    gqa = build_tiny_model("llama", root / "gqa", with_tokenizer=True, hidden=32, n_heads=4, n_kv_heads=1, seed=1)
    bare = build_tiny_model("llama", root / "bare", hidden=32, n_heads=4, vocab=50257)  # no tokenizer files
    other = build_tiny_model("llama", root / "other", hidden=32, n_heads=4)  # vocab 256, its own tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["the", "a", "of", "and", "to"])}}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(other)
    text = root / "text.txt"
    text.write_text(tinyshakespeare_split("test")[:700], encoding="utf-8")
    empty = root / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    return types.SimpleNamespace(root=root, mha=str(mha), gqa=str(gqa), bare=str(bare), other=str(other),
                                 text=str(text), empty=str(empty))


def invoke(*args):
    return runner.invoke(app, ["eval", *map(str, args)])


def test_reference_run_writes_reports(env):
    out = env.root / "out"
    r = invoke(env.gqa, "--reference", env.mha, "--data", env.text, "-L", 48, "-S", 24, "-b", 3, "--out", out)
    assert r.exit_code == 0, r.output
    results = json.loads((out / "results.json").read_text())
    ref, gqa = results["models"]
    assert ref["is_reference"] and ref["name"] == env.mha and gqa["name"] == env.gqa
    assert (ref["n_kv_heads"], gqa["n_kv_heads"]) == (4, 1)
    assert ref["kv_bytes_per_token"] == 4 * gqa["kv_bytes_per_token"] == 2 * 2 * 32 * 4  # layers*K,V*hidden*fp32
    assert gqa["kl"] > 0 and 0 <= gqa["top1_agreement"] < 1
    assert gqa["ppl_ratio"] == pytest.approx(gqa["token_perplexity"] / ref["token_perplexity"], rel=1e-9)
    assert gqa["n_tokens"] == ref["n_tokens"] and (results["max_length"], results["stride"]) == (48, 24)
    assert results["n_bytes"] == len(tinyshakespeare_split("test")[:700].encode())
    assert math.isclose(gqa["bits_per_byte"], gqa["nll_sum"] / (results["n_bytes"] * math.log(2)))
    md = (out / "results.md").read_text()
    assert "KL(src\\|\\|model)" in md and env.gqa in md
    assert (out / "perplexity_vs_kv.png").read_bytes()[:4] == b"\x89PNG"
    assert "top-1 agree" in r.output


def test_decode_rows_reach_reports(env, monkeypatch):
    calls = []

    def fake_decode_benchmark(model, *, contexts, batches, new_tokens, baseline, kernel, repeats, progress):
        # Stands in for attnconv.eval.decode (tested on its own): a grid shaped like its real output.
        calls.append((model.config.num_key_value_heads, contexts, batches, new_tokens, baseline, kernel))
        rows = [{"impl": impl, "batch": b, "context": c, "prefill_s": 0.01 * c / 512, "tokens_per_s": 1e4 / c * f,
                 "ms_per_token": c / 1e4 / f * 1e3, "kv_bytes_theoretical": c * b * 256, "kv_bytes_measured": None,
                 "peak_mem_bytes": None, "roofline_tokens_per_s": None, "bandwidth_fraction": None}
                for impl, f in (("attnconv", 1.2), ("hf-static", 1.0)) for b in batches for c in contexts]
        return {"rows": rows, "notes": [f"contexts {contexts} seen"], "bandwidth_bytes_per_s": 1e10}

    monkeypatch.setitem(sys.modules, "attnconv.eval.decode",
                        types.SimpleNamespace(decode_benchmark=fake_decode_benchmark,
                                              unsupported_reason=lambda model: None))
    out = env.root / "out-decode"
    r = invoke(env.gqa, "--reference", env.mha, "--data", env.text, "-L", 32, "--decode", "--contexts", "64,128",
               "--batches", "1,2", "--new-tokens", 8, "--decode-kernel", "torch", "--out", out)
    assert r.exit_code == 0, r.output
    # Every model and the reference are measured with the user's grid, once each.
    assert sorted(calls) == [(1, (64, 128), (1, 2), 8, True, "torch"), (4, (64, 128), (1, 2), 8, True, "torch")]
    assert "contexts (64, 128) seen" in r.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["decode"]) == {env.mha, env.gqa}
    rows = results["decode"][env.gqa]["rows"]
    assert {(x["impl"], x["batch"], x["context"]) for x in rows} == {
        (i, b, c) for i in ("attnconv", "hf-static") for b in (1, 2) for c in (64, 128)}
    assert "## Decode speed" in (out / "results.md").read_text()
    assert (out / "decode_tokens_per_s.png").read_bytes()[:4] == b"\x89PNG"


def test_clamps_max_length_to_model_positions(env):
    r = invoke(env.mha, "--data", env.text, "-L", 5000, "-b", 1)
    assert r.exit_code == 0, r.output
    assert "using 512" in r.output and "S=256" in r.output


def test_bare_model_folder_needs_tokenizer(env):
    r = invoke(env.bare, "--data", env.text, "-L", 32)
    assert isinstance(r.exception, AttnconvError) and "--tokenizer" in str(r.exception)
    r = invoke(env.bare, "--data", env.text, "-L", 32, "--tokenizer", env.mha)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("case", ["empty", "missing", "tokenizer", "stride", "kernel"])
def test_bad_input_is_refused(env, case):
    args = {"empty": [env.mha, "--data", env.empty],
            "missing": [env.mha, "--data", str(env.root / "nope.txt")],
            "tokenizer": [env.mha, "--reference", env.other, "--data", env.text],
            "stride": [env.mha, "--data", env.text, "-L", 16, "-S", 32],
            "kernel": [env.mha, "--data", env.text, "--decode", "--decode-kernel", "fast"]}[case]
    r = invoke(*args)
    assert isinstance(r.exception, AttnconvError), r.output
    assert "\n" not in str(r.exception)
    if case == "tokenizer":
        assert "different tokenizers" in str(r.exception)
    if case == "kernel":
        assert "--decode-kernel must be one of auto, native, torch, not 'fast'" in str(r.exception)


def test_existing_out_is_refused_and_untouched(env):
    out = env.root / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = invoke(env.mha, "--data", env.text, "-L", 32, "--out", out)
    assert isinstance(r.exception, AttnconvError) and "--overwrite" in str(r.exception)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    r = invoke(env.mha, "--data", env.text, "-L", 32, "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["perplexity_vs_kv.png", "results.json", "results.md"]
    assert not [p for p in env.root.iterdir() if ".attnconv-tmp-" in p.name]


def test_command_line_error_is_one_line(env):
    p = subprocess.run([sys.executable, "-m", "attnconv", "eval", env.mha, "--data", env.empty],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert "empty" in p.stderr


def test_help_lists_options():
    r = runner.invoke(app, ["eval", "--help"])
    assert r.exit_code == 0
    for opt in ("--data", "--max-length", "--stride", "--batch-size", "--dtype", "--reference", "--decode",
                "--out", "--tokenizer", "--decode-kernel"):
        assert opt in r.output

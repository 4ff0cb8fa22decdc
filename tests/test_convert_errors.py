"""convert: bad input ends in one line, a non-zero exit, nothing written, and the source untouched."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from attnconv.testing import assert_one_line_error, build_tiny_model


def tree_digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("src") / "llama", with_tokenizer=False)


def test_missing_and_non_model_folders(cli, tmp_path):
    code, _, err = cli("convert", tmp_path / "nope", tmp_path / "out", "--to", "mqa")
    assert_one_line_error(code, err, "no such folder")
    (tmp_path / "empty").mkdir()
    code, _, err = cli("convert", tmp_path / "empty", tmp_path / "out", "--to", "mqa")
    assert_one_line_error(code, err, "not a model folder")
    (tmp_path / "weightless").mkdir()
    shutil.copy(build_tiny_model("llama", tmp_path / "m") / "config.json", tmp_path / "weightless")
    code, _, err = cli("convert", tmp_path / "weightless", tmp_path / "out", "--to", "mqa")
    assert_one_line_error(code, err, "has no weights")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_supported_families(cli, tmp_path):
    from transformers import AutoModelForCausalLM, OPTConfig

    cfg = OPTConfig(hidden_size=32, num_attention_heads=4, ffn_dim=64, num_hidden_layers=1, vocab_size=64,
                    word_embed_proj_dim=32, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "opt")
    code, _, err = cli("convert", tmp_path / "opt", tmp_path / "out", "--to", "mqa")
    assert_one_line_error(code, err, "'opt'", "not supported", "llama", "phi3", "gpt2")


@pytest.mark.parametrize("kv, needle", [("3", "does not divide"), ("8", "exceeds"), ("0", ">= 1")])
def test_bad_kv_heads(cli, llama, tmp_path, kv, needle):
    code, _, err = cli("convert", llama, tmp_path / "out", "--kv-heads", kv)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_gqa_without_kv_heads_and_mqa_with_other_kv(cli, llama, tmp_path):
    assert_one_line_error(*cli("convert", llama, tmp_path / "o")[::2], "--kv-heads")
    assert_one_line_error(*cli("convert", llama, tmp_path / "o", "--to", "mqa", "--kv-heads", "2")[::2], "mqa")


def test_truncated_and_corrupted_shards(cli, llama, tmp_path):
    for name, damage in [("truncated", lambda b: b[: len(b) // 2]), ("header", lambda b: b"\xff" * 8 + b[8:]),
                         ("garbage", lambda b: b[:8] + b"{not json" + b[17:])]:
        src = tmp_path / name
        shutil.copytree(llama, src)
        f = src / "model.safetensors"
        f.write_bytes(damage(f.read_bytes()))
        code, _, err = cli("convert", src, tmp_path / f"out-{name}", "--kv-heads", "2")
        assert_one_line_error(code, err, "truncated or corrupted", "model.safetensors")
        assert not (tmp_path / f"out-{name}").exists()


def test_existing_output_needs_overwrite(cli, llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = cli("convert", llama, out, "--kv-heads", "2")
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    code, _, err = cli("convert", llama, out, "--kv-heads", "2", "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    code, _, err = cli("convert", llama, llama, "--kv-heads", "2", "--overwrite")
    assert_one_line_error(code, err, "inputs are never modified")


def test_pickle_weights_need_allow_pickle(cli, llama, tmp_path):
    src = tmp_path / "pickled"
    shutil.copytree(llama, src)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    code, _, err = cli("convert", src, tmp_path / "out", "--kv-heads", "2")
    assert_one_line_error(code, err, "pickle", "--allow-pickle")
    assert not (tmp_path / "out").exists()
    code, _, err = cli("convert", src, tmp_path / "out", "--kv-heads", "2", "--allow-pickle")
    assert code == 0, err
    code, _, err = cli("convert", llama, tmp_path / "ref", "--kv-heads", "2")
    a, b = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_source_is_never_modified(cli, llama, tmp_path):
    before = tree_digest(llama)
    for args in (["--kv-heads", "2"], ["--to", "mqa", "--dtype", "bfloat16"], ["--kv-heads", "3"],
                 ["--kv-heads", "1", "--method", "random", "--dry-run"]):
        cli("convert", llama, tmp_path / "o", *args, "--overwrite")
    assert tree_digest(llama) == before


def test_sigkill_at_any_moment_leaves_no_output(tmp_path):
    # Big enough that writing takes a moment; many shards so a kill can land between them.
    src = build_tiny_model("llama", tmp_path / "src", hidden=256, layers=6, vocab=4096, max_shard_size="1MB")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "attnconv", "convert", str(src), str(out), "--kv-heads", "2"]
    kills = 0
    for stage in ("tmp-exists", "first-shard", "late"):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            tmps = list(tmp_path.glob(".out.attnconv-tmp-*"))
            shards = [p for t in tmps for p in t.glob("model-*.safetensors")]
            if (stage == "tmp-exists" and tmps) or (stage == "first-shard" and shards) or \
                    (stage == "late" and len(shards) > 5):
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait()
        assert not out.exists(), f"OUT appeared after a kill at {stage}"
    assert kills >= 2
    # The next run cleans what the killed ones left and completes.
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.is_dir() and not list(tmp_path.glob(".out.attnconv-tmp-*"))


@pytest.mark.parametrize("args, needle", [
    (["convert", "a", "b", "--bogus"], "--bogus"),
    (["nosuchcommand"], "nosuchcommand"),
    (["eval", "--batch-size", "2"], "MODEL"),
])
def test_usage_errors_are_one_line(cli, args, needle):
    code, _, err = cli(*args)
    assert_one_line_error(code, err, needle, "--help")
    assert code == 2


@pytest.mark.parametrize("args, needle", [
    (["convert", "a", "b", "--kv-heads", "x"], "--kv-heads must be an integer >= 1, not 'x'"),
    (["convert", "a", "b", "--kv-heads", "0"], "--kv-heads must be an integer >= 1, not 0"),
    (["convert", "a", "b", "--to", "mla2"], "--to must be one of gqa, mqa, mla, not 'mla2'"),
    (["convert", "a", "b", "--dtype", "int8"], "--dtype must be one of auto, float32, bfloat16, float16"),
    (["uptrain", "a", "b", "--data", "d", "--max-grad-norm", "-1"], "--max-grad-norm must be a number >= 0"),
    (["uptrain", "a", "b", "--data", "d", "--lr", "nan"], "--lr must be a finite number > 0"),
    (["eval", "a", "--contexts", "512,x"], "--contexts must be an integer >= 1, not 'x'"),
])
def test_bad_values_are_refused_with_one_wording(cli, args, needle):
    code, _, err = cli(*args)
    assert_one_line_error(code, err, needle)
    assert code == 2


def test_console_entry_keeps_exit_codes_and_flushes_output(tmp_path):
    # `python -m attnconv` skips the interpreter's teardown (cli.run): the exit code and stderr must survive it.
    cmd = [sys.executable, "-m", "attnconv", "convert", str(tmp_path / "missing"), str(tmp_path / "o"),
           "--kv-heads", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert_one_line_error(done.returncode, done.stderr, "no such folder")
    ok = subprocess.run([sys.executable, "-m", "attnconv", "--version"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and ok.stdout.strip().startswith("attnconv ")


def test_disk_full_mid_conversion_is_one_line_and_leaves_nothing(cli, llama, tmp_path, monkeypatch):
    import errno

    from attnconv import tensor_io

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tensor_io.ShardWriter, "write", full)  # the first converted tensor hits a full disk
    code, _, err = cli("convert", llama, tmp_path / "out", "--kv-heads", "2")
    assert_one_line_error(code, err, "No space left on device", "free some space")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.attnconv-tmp-*"))


@pytest.mark.parametrize("args, needle", [
    (["--to", "gqa", "--kv-heads", "2", "--calibrate", "tinyshakespeare"], "--calibrate is unused"),
    (["--to", "mla", "--kv-rank", "16", "--init", "svd", "--no-phases", "--calibrate", "tinyshakespeare"],
     "--calibrate is unused"),
    (["--to", "mla", "--kv-rank", "16", "--calib-seq-len", "4096"], "exceeds the model's 512 positions"),
    (["--to", "mla", "--kv-rank", "16", "--calib-tokens", "1"], "less than one calibration sequence of 512"),
    (["--to", "gqa", "--kv-heads", "2", "--method", "fit", "--calib-tokens", "100", "--calib-seq-len", "128"],
     "less than one calibration sequence of 128"),
])
def test_calibration_that_would_be_ignored_or_bent_is_refused(cli, llama, tmp_path, args, needle):
    code, _, err = cli("convert", llama, tmp_path / "out", *args)
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [["--to", "mla", "--kv-rank", "16", "--init", "svd", "--no-phases"],
                                  ["--to", "mla", "--format", "attnconv", "--kv-rank", "16", "--init", "svd",
                                   "--no-phases"],
                                  ["--to", "gqa", "--kv-heads", "2", "--method", "fit"],
                                  ["--to", "gqa", "--kv-heads", "2"]])
def test_config_sizes_that_do_not_match_the_weights_are_one_line(cli, llama, tmp_path, args):
    import json

    src = shutil.copytree(llama, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "head_dim": 8}))  # the weights' heads are of 16
    code, _, err = cli("convert", src, tmp_path / "out", *args)
    assert_one_line_error(code, err, "do", "fit the config's 4 heads / 4 KV heads of 8")
    assert not (tmp_path / "out").exists()


def test_q_rank_refusal_speaks_of_the_query(cli, llama, tmp_path):
    code, _, err = cli("convert", llama, tmp_path / "out", "--to", "mla", "--kv-rank", "16", "--q-rank", "5000",
                       "--init", "svd", "--no-phases")
    assert_one_line_error(code, err, "--q-rank 5000 exceeds the hidden size 64, which is already exact")
    assert "NoPE" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("eps", [-1, 0, 1.5, "x"])
def test_a_norm_epsilon_out_of_range_is_refused_by_the_loading_gate(cli, llama, tmp_path, eps):
    import json

    src = shutil.copytree(llama, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "rms_norm_eps": eps}))
    for args in (["convert", src, tmp_path / "out", "--to", "mqa"], ["info", src],
                 ["eval", src, "--data", "tinyshakespeare:test", "-L", "16"]):
        code, _, err = cli(*args)
        assert_one_line_error(code, err, "rms_norm_eps", "not a small positive number")

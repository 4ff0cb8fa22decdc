"""Inputs that used to surface late or as tracebacks: a decode grid beyond memory is refused before anything is
allocated, with the size it needs; a model folder without tokenizer.json says so instead of "0 tokens"."""

from __future__ import annotations

import shutil
import time

import pytest

from attnconv.testing import assert_one_line_error


def test_a_decode_grid_beyond_memory_is_refused_before_allocating(cli, tiny, monkeypatch):
    import attnconv.eval.decode as decode

    root, model = tiny
    measured = []
    monkeypatch.setattr(decode, "measure_bandwidth", lambda device: measured.append(device) or 1e9)
    t0 = time.perf_counter()
    code, _, err = cli("eval", model, "--no-perplexity", "--decode", "--contexts", "32", "--batches", "100000000",
                       "--data", root / "text.txt", "--quiet")
    # 1e8 x (32 + 32 new) tokens x 2 layers x 2 x 4 KV heads x 8 values x 4 bytes = 3,051.8 GiB of cache
    assert_one_line_error(code, err, "batch 100000000, context 32", "3,051.8 GiB of KV cache", "lower --batches")
    assert time.perf_counter() - t0 < 30 and not measured  # refused before the first allocation
    monkeypatch.setattr(decode, "available_memory", lambda device: 10 << 20)  # 10 MiB left
    code, _, err = cli("eval", model, "--no-perplexity", "--decode", "--contexts", "32", "--batches", "2000",
                       "--data", root / "text.txt", "--quiet")
    assert_one_line_error(code, err, "but cpu has 0.0 GiB available")


def test_a_missing_tokenizer_json_is_named(cli, tiny, tmp_path):
    root, model = tiny
    broken = shutil.copytree(model, tmp_path / "m")
    (broken / "tokenizer.json").unlink()
    code, _, err = cli("eval", broken, "--data", root / "text.txt", "-L", "16")
    assert_one_line_error(code, err, "has no vocabulary", "tokenizer.json or vocabulary files are missing")


@pytest.mark.parametrize("args, needle", [(["--batch-size", "²"], "--batch-size must be an integer >= 1, not '²'"),
                                          (["--batch-size", "+-5"], "not '+-5'"),
                                          (["--batch-size", "9" * 5000], "(5002 characters)")])
def test_bad_integers_on_the_command_line_are_one_line(cli, tiny, args, needle):
    root, model = tiny
    code, _, err = cli("eval", model, "--data", root / "text.txt", *args)
    assert_one_line_error(code, err, needle)
    code, _, err = cli("convert", model, root / "o", "--to", "mla", "--kv-rank", args[1], "--dry-run")
    assert_one_line_error(code, err, "--kv-rank must be an integer")

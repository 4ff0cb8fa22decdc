"""Hostile folders and faults across commands: the loading gate, protected inputs, the output lock, the
--overwrite swap, name limits, strict reports, and a seeded fuzz of headers and configs."""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnconv.convert.layout import inspect_source
from attnconv.convert.settings import ConvertSettings
from attnconv.errors import AttnconvError
from attnconv.loading import load_causal_lm
from attnconv.outputs import output_lock
from attnconv.testing import assert_one_line_error, build_tiny_model


def _copy(model, dest):
    shutil.copytree(model, dest)
    return dest


def _one_line_everywhere(cli, folder, text, needle, tmp_path):
    """eval, uptrain, convert, info and push all refuse FOLDER with one line naming NEEDLE."""
    runs = {"eval": ["eval", folder, "--data", text, "-L", "16"],
            "uptrain": ["uptrain", folder, tmp_path / "up", "--data", text, "--steps", "1", "--seq-len", "8",
                        "--quiet"],
            "convert": ["convert", folder, tmp_path / "conv", "--to", "mqa"],
            "info": ["info", folder]}
    for name, args in runs.items():
        code, _, err = cli(*args)
        assert_one_line_error(code, err, needle)
        assert not (tmp_path / "up").exists() and not (tmp_path / "conv").exists(), name


def test_an_index_may_not_lead_to_pickles_or_out_of_the_folder(cli, tiny, tmp_path):
    root, model = tiny
    decoy = _copy(model, tmp_path / "decoy")
    weights = load_file(decoy / "model.safetensors")
    (decoy / "model.safetensors").unlink()
    save_file({"x": torch.zeros(1)}, decoy / "decoy.safetensors")
    torch.save(weights, decoy / "pytorch_model.bin")
    index = {"metadata": {}, "weight_map": dict.fromkeys(weights, "pytorch_model.bin")}
    (decoy / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line_everywhere(cli, decoy, root / "text.txt", "may name only .safetensors", tmp_path)

    escape = _copy(model, tmp_path / "escape")
    index = {"metadata": {}, "weight_map": dict.fromkeys(weights, "../../etc/passwd")}
    (escape / "model.safetensors").rename(escape / "model-00001-of-00001.safetensors")
    (escape / "model.safetensors.index.json").write_text(json.dumps(index))
    _one_line_everywhere(cli, escape, root / "text.txt", "'../../etc/passwd'", tmp_path)


def test_a_link_out_of_the_folder_is_refused_by_every_command(cli, tiny, tmp_path):
    root, model = tiny
    outside = tmp_path / "secret.txt"
    outside.write_text("not for the hub")
    linked = _copy(model, tmp_path / "linked")
    (linked / "notes.txt").symlink_to(outside)
    _one_line_everywhere(cli, linked, root / "text.txt", "outside the model folder", tmp_path)
    code, _, err = cli("push", linked, "me/x", "--dry-run")
    assert_one_line_error(code, err, "notes.txt", "outside the model folder")
    inside = _copy(model, tmp_path / "inside")
    (inside / "alias.json").symlink_to(inside / "config.json")  # a link within the folder is fine
    code, out, err = cli("info", inside)
    assert code == 0, err


def test_weights_that_do_not_match_the_config_are_never_loaded(cli, tiny, tmp_path):
    root, model = tiny
    missing = _copy(model, tmp_path / "missing")
    weights = load_file(missing / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.weight"]
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AttnconvError, match="layer 0 lacks self_attn.k_proj.weight"):
        load_causal_lm(missing)
    _one_line_everywhere(cli, missing, root / "text.txt", "k_proj", tmp_path)

    gpt2 = build_tiny_model("gpt2", tmp_path / "gpt2", hidden=32, n_heads=4)
    foreign = _copy(model, tmp_path / "foreign")
    shutil.copy(gpt2 / "model.safetensors", foreign / "model.safetensors")
    with pytest.raises(AttnconvError, match="do not match"):
        load_causal_lm(foreign)

    huge = _copy(model, tmp_path / "huge")
    config = json.loads((huge / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100_000}))
    t0 = time.perf_counter()
    _one_line_everywhere(cli, huge, root / "text.txt", "100000", tmp_path)
    assert time.perf_counter() - t0 < 60  # refused from the headers, nothing allocated for 100,000 layers


@pytest.mark.parametrize("key, value, needle", [("num_attention_heads", "eight", "num_attention_heads is 'eight'"),
                                                ("hidden_size", -64, "hidden_size is -64"),
                                                ("vocab_size", 1.5, "vocab_size is 1.5"),
                                                ("model_type", None, "no model_type")])
def test_config_values_are_checked_before_anything_loads(cli, tiny, tmp_path, key, value, needle):
    root, model = tiny
    bad = _copy(model, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, key: value}))
    _one_line_everywhere(cli, bad, root / "text.txt", needle, tmp_path)


def test_no_command_writes_into_around_or_over_an_input(cli, tiny, tmp_path):
    root, model = tiny
    outer = _copy(model, tmp_path / "outer")
    _copy(model, outer / "inner")
    before = sorted(p.name for p in outer.iterdir())
    text = root / "text.txt"
    cases = [["eval", outer, "--data", text, "-L", "16", "--out", outer, "--overwrite"],
             ["eval", outer, "--data", text, "-L", "16", "--out", outer / "report"],
             ["eval", outer, "--data", text, "-L", "16", "--out", tmp_path, "--overwrite"],
             ["uptrain", outer / "inner", outer, "--data", text, "--overwrite"],
             ["uptrain", outer, outer / "up", "--data", text, "--steps", "1"],
             ["uptrain", model, tmp_path / "up", "--data", text, "--teacher", tmp_path, "--overwrite"],
             ["convert", outer, outer, "--to", "mqa", "--overwrite"],
             ["convert", outer, outer / "mqa", "--to", "mqa"]]
    for args in cases:
        code, _, err = cli(*args)
        assert_one_line_error(code, err, "inputs are never modified")
    assert sorted(p.name for p in outer.iterdir()) == before
    assert not (tmp_path / "up").exists()


def test_a_second_writer_fails_at_once_naming_the_first(cli, tiny, tmp_path):
    root, model = tiny
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom attnconv.outputs import output_lock\n"
         f"with output_lock({str(out)!r}):\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        code, _, err = cli("convert", model, out, "--to", "mqa")
        assert_one_line_error(code, err, "is being written by attnconv", f"pid {holder.pid}")
        assert time.perf_counter() - t0 < 30 and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    code, _, err = cli("convert", model, out, "--to", "mqa")  # the lock died with its holder
    assert code == 0, err
    with output_lock(out), output_lock(out):  # re-entrant within a process
        pass
    assert not [p for p in tmp_path.iterdir() if "attnconv-lock" in p.name]


def test_a_kill_between_the_renames_of_overwrite_loses_neither_output(tiny, tmp_path):
    root, model = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous output")
    # Where the one-step exchange is unavailable, two renames; a SIGKILL after the first leaves OUT missing.
    script = ("import os\nfrom attnconv import outputs\noutputs._exchange = lambda a, b: False\n"
              "real = os.rename\ncalls = []\n"
              "def rename(a, b):\n    calls.append(a)\n    real(a, b)\n"
              "    if len(calls) == 1: os.kill(os.getpid(), 9)\n"
              "os.rename = rename\n"
              f"with outputs.atomic_output_dir({str(out)!r}, overwrite=True) as tmp:\n"
              "    (tmp / 'new.txt').write_text('the new output')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert not out.exists() and [p for p in tmp_path.iterdir() if ".attnconv-old-" in p.name]
    from attnconv.outputs import atomic_output_dir, clean_stale

    assert clean_stale(out) == [f"restored {out} from an interrupted replacement"]
    assert (out / "old.txt").read_text() == "the previous output"
    with atomic_output_dir(out, overwrite=True) as tmp:  # the one-step exchange: the old output goes at the end
        (tmp / "new.txt").write_text("the new output")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_names_up_to_the_limit_work_and_longer_ones_fail_first(cli, tiny, tmp_path):
    root, model = tiny
    long_ok = tmp_path / ("o" * 250)
    code, _, err = cli("convert", model, long_ok, "--to", "mqa")
    assert code == 0, err
    code, _, err = cli("eval", model, "--data", root / "text.txt", "-L", "16", "--out", tmp_path / ("r" * 255))
    assert code == 0, err
    code, _, err = cli("eval", model, "--data", root / "text.txt", "-L", "16", "--out", tmp_path / ("r" * 256))
    assert_one_line_error(code, err, "longer than 255 bytes")
    assert sorted(len(p.name) for p in tmp_path.iterdir()) == [250, 255]


def test_results_json_is_strict_json(tmp_path):
    from attnconv.eval.report import write_reports

    results = {"data": "x", "n_documents": 1, "n_words": 1, "n_bytes": 1, "max_length": 8, "stride": 4,
               "models": [{"name": "m", "architecture": "A", "n_heads": 1, "n_kv_heads": 1, "kv_bytes_per_token": 8,
                           "params": 10, "token_perplexity": float("inf"), "word_perplexity": float("nan"),
                           "byte_perplexity": 1.0, "bits_per_byte": 0.0, "n_tokens": 3}],
               "decode": {}, "notes": []}
    write_reports(results, tmp_path)

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    loaded = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert loaded["models"][0]["token_perplexity"] is None and loaded["models"][0]["byte_perplexity"] == 1.0


def _mutate_header(path, rng):
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = rng.choice([k for k in header if k != "__metadata__"])
    kind = rng.randrange(7)
    if kind == 0:
        raw = raw[:rng.randrange(8, len(raw))]  # truncated
    elif kind == 1:
        raw[:8] = struct.pack("<Q", rng.choice([0, 3, n + 1, len(raw) * 2, 2**63]))
    elif kind == 2:
        raw[8 + rng.randrange(n)] = rng.randrange(256)  # a byte of the JSON header
    else:
        entry = header[name]
        if kind == 3:
            entry["dtype"] = rng.choice(["F64", "I8", "Q4", 7])
        elif kind == 4:
            entry["shape"] = rng.choice([[], [1], [-3, 4], [10**12, 10**12], "x"])
        elif kind == 5:
            entry["data_offsets"] = rng.choice([[0, 10**15], [5, 3], [-1, 8], "x"])
        else:
            header[name + ".extra"] = dict(entry)
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        raw = bytearray(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    path.write_bytes(bytes(raw))


def _mutate_config(path, rng):
    config = json.loads(path.read_text())
    key = rng.choice(["num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                      "intermediate_size", "max_position_embeddings", "head_dim", "rope_parameters", "model_type",
                      "rms_norm_eps", "tie_word_embeddings"])
    config[key] = rng.choice([None, -1, 0, 3, 10**9, "x", [], {}, 1.5, True])
    path.write_text(json.dumps(config))


def test_fuzzed_headers_and_configs_end_in_one_line_or_a_correct_load(tiny, tmp_path):
    """Seeded and bounded: every mutation, through every command's loading gate, ends in an AttnconvError of one
    line or in a load that gives the model's own logits; never another exception."""
    from attnconv.convert.info import model_info
    from attnconv.push.api import plan_push
    from attnconv.push.settings import PushSettings

    root, model = tiny
    reference = load_causal_lm(model)
    ids = torch.arange(10)[None]
    rng = random.Random(0)
    outcomes = {"error": 0, "loaded": 0}
    for case in range(24):
        folder = _copy(model, tmp_path / f"case{case}")
        (_mutate_header if case % 2 == 0 else _mutate_config)(
            folder / ("model.safetensors" if case % 2 == 0 else "config.json"), rng)
        gates = [lambda f=folder: inspect_source(ConvertSettings(str(f), to="mqa", dry_run=True)),
                 lambda f=folder: model_info(f), lambda f=folder: plan_push(PushSettings(str(f), "me/x", dry_run=True)),
                 lambda f=folder: load_causal_lm(f)]
        for gate in gates:
            try:
                result = gate()
            except AttnconvError as e:
                assert "\n" not in str(e), str(e)
                outcomes["error"] += 1
                continue
            outcomes["loaded"] += 1
            if isinstance(result, torch.nn.Module):
                with torch.no_grad():
                    torch.testing.assert_close(result(ids).logits, reference(ids).logits)
        shutil.rmtree(folder)
    assert outcomes["error"] > 24 and outcomes["loaded"] > 0, outcomes


def test_stale_token_cache_temporaries_are_cleaned(tmp_path):
    from attnconv.uptrain.data import tokenize_cached

    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache / f".tokens-abc.{int(dead.stdout)}.tmp"
    stale.write_bytes(b"\0" * 64)
    mine = cache / f".tokens-def.{os.getpid()}.tmp"
    mine.write_bytes(b"\0")

    class Tok:  # the smallest tokenizer tokenize_cached needs
        eos_token_id, bos_token_id, model_max_length = 0, None, 10

        def get_vocab(self):
            return {"a": 1}

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[1] * len(t) for t in texts]}

    tokenize_cached(["aaa"], Tok(), cache)
    assert not stale.exists() and mine.exists()

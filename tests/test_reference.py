"""The embedded reference model: its files match its recorded training run, and it is the model the run describes.

Perplexity is recomputed here independently of scripts/train_reference.py: the Hugging Face perplexity guide's
unbatched loop, with context tokens masked by label -100 and transformers' own loss.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from attnconv.errors import AttnconvError
from attnconv.reference import REFERENCE_DIR, TRAIN_RUN_FILE, load_train_run
from attnconv.textdata import tinyshakespeare_split

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_reference.py"


@pytest.fixture(scope="module")
def run() -> dict:
    return load_train_run(REFERENCE_DIR)


@pytest.fixture(scope="module")
def model(one_torch_thread):  # two threads spin-wait on busy cores (4-5x slower measured); one is never far off
    return AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, local_files_only=True, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REFERENCE_DIR, local_files_only=True)


def test_weights_match_recorded_checksum(run):
    weights = REFERENCE_DIR / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == run["model_safetensors_sha256"]
    assert weights.stat().st_size <= 20 * 10**6
    assert "public domain" in (REFERENCE_DIR / "NOTICE").read_text()


def test_is_the_recorded_mha_llama(model, run):
    cfg = model.config
    assert cfg.model_type == "llama"
    assert cfg.num_key_value_heads == cfg.num_attention_heads == run["config"]["num_attention_heads"]
    assert cfg.num_hidden_layers == run["config"]["num_hidden_layers"]
    assert sum(p.numel() for p in model.parameters()) == run["parameters"]
    assert model.model.layers[0].self_attn.k_proj.weight.shape == model.model.layers[0].self_attn.q_proj.weight.shape


def test_tokenizer_round_trips_heldout_text(tokenizer, run):
    text = tinyshakespeare_split("test")
    ids = tokenizer(text, verbose=False)["input_ids"]
    assert len(tokenizer) == run["tokenizer"]["vocab_size"]
    assert len(ids) == run["heldout"]["tokens"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"


def strided_perplexity(model, ids: torch.Tensor, length: int, stride: int) -> tuple[float, int, int]:
    """(perplexity, scored tokens, windows) of the guide's loop over ids [n]."""
    n = len(ids)
    windows, prev_end = [], 0  # (input ids, labels with the context tokens masked)
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        labels = ids[begin:end].clone()
        labels[: (end - begin) - (end - prev_end)] = -100  # tokens an earlier window already scored
        windows.append((ids[begin:end], labels))
        prev_end = end
        if end == n:
            break
    full = [w for w in windows if len(w[0]) == length]
    batches = [full[i:i + 16] for i in range(0, len(full), 16)] + [[w] for w in windows if len(w[0]) != length]
    nll_sum, n_scored = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            x, labels = torch.stack([w[0] for w in batch]), torch.stack([w[1] for w in batch])  # [B, len]
            n_valid = int((labels[:, 1:] != -100).sum())  # transformers shifts labels left by one
            # transformers' logits_to_keep: only the positions from the one before the first scored label on
            # (the same loss; the vocabulary projection of the context alone was ~15% of the time)
            keep = min(x.shape[1], x.shape[1] - int((labels != -100).any(0).nonzero()[0]) + 1)
            loss = model(input_ids=x, labels=labels[:, -keep:], logits_to_keep=keep).loss
            nll_sum += loss.item() * n_valid  # its loss is the mean
            n_scored += n_valid
    return math.exp(nll_sum / n_scored), n_scored, len(windows)


def test_heldout_perplexity_matches_record(model, tokenizer, run):
    rec = run["heldout"]
    ids = tokenizer(tinyshakespeare_split("test"), return_tensors="pt", verbose=False).input_ids[0]  # [n]
    ppl, n_scored, n_windows = strided_perplexity(model, ids, rec["max_length"], rec["stride"])
    n = len(ids)
    assert n_scored == rec["scored_tokens"] == (n - 1 if rec["stride"] < rec["max_length"] else n - n_windows)
    assert ppl == pytest.approx(rec["perplexity"], rel=0.01)
    assert ppl < len(tokenizer) / 20  # learned structure: far below a uniform guess over the vocabulary


def test_load_train_run_missing_is_a_clear_error(tmp_path):
    with pytest.raises(AttnconvError, match="train_reference.py"):
        load_train_run(tmp_path)
    (tmp_path / TRAIN_RUN_FILE).write_text("{not json")
    with pytest.raises(AttnconvError, match="not valid JSON"):
        load_train_run(tmp_path)


def _script_module():
    spec = importlib.util.spec_from_file_location("train_reference", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("n,length,stride", [(10, 4, 2), (11, 4, 3), (1000, 256, 128), (300, 256, 128), (11, 4, 4)])
def test_strided_windows_match_the_guides_scoring(n, length, stride):
    counts = torch.zeros(n, dtype=torch.long)
    for begin, end, first in _script_module().strided_windows(n, length, stride):
        assert end - begin <= length
        counts[begin + first:end] += 1
    if stride < length:  # overlapping windows: every token but the first of the text is scored once
        expected = torch.ones(n, dtype=torch.long)
        expected[0] = 0
    else:  # disjoint windows: the first token of each window has no context and is not scored
        expected = (torch.arange(n) % length != 0).long()
    assert torch.equal(counts, expected)


def test_script_writes_a_consistent_tiny_model(tmp_path, capsys):
    """The script's main, run in this process on the first 20,000 characters of each split: a child process spent
    more time importing torch and transformers than on this run, and training the tokenizer on the whole train
    split and scoring the whole held-out split took most of the rest."""
    out = tmp_path / "ref"
    tiny = ["--steps", "3", "--warmup", "1", "--batch-size", "2", "--seq-len", "32", "--layers", "1", "--hidden", "32",
            "--heads", "2", "--intermediate", "64", "--vocab-size", "300", "--eval-length", "64", "--eval-stride", "64",
            "--log-every", "1", "--threads", "1"]
    script = _script_module()
    script.tinyshakespeare_split = lambda split: tinyshakespeare_split(split)[:20_000]
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng(devices=[]):  # the script seeds torch's generator and sets its threads
            script.main(["--out", str(out), *tiny])
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    rec = json.loads((out / TRAIN_RUN_FILE).read_text())
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() == rec["model_safetensors_sha256"]
    assert rec["tokens_seen"] == 3 * 2 * 32 and rec["tokenizer"]["vocab_size"] == 300
    assert rec["config"]["num_key_value_heads"] == rec["config"]["num_attention_heads"] == 2
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.decode(tok("To be, or not to be\n\u00e9")["input_ids"]) == "To be, or not to be\n\u00e9"
    with pytest.raises(SystemExit) as again:  # refused before any training: the script's main, in this process
        _script_module().main(["--out", str(out), *tiny])
    assert again.value.code == 2 and "already exists" in capsys.readouterr().err


def test_attnconv_eval_equals_the_guide_loop(cli, model, tokenizer, run, tmp_path):
    """`attnconv eval` on held-out text (a twentieth of it, 1,818 tokens: the first window, three of eval's
    batches of 4 full windows and a shorter last one; the whole is the loop test's) gives the guide loop's
    perplexity with the recorded window settings."""
    rec = run["heldout"]
    text = tinyshakespeare_split("test")
    text = text[: len(text) // 20]
    (tmp_path / "heldout.txt").write_text(text, encoding="utf-8")
    code, _, err = cli("eval", REFERENCE_DIR, "--data", tmp_path / "heldout.txt", "-L", rec["max_length"],
                       "-S", rec["stride"], "--out", tmp_path / "report")
    assert code == 0, err
    row = json.loads((tmp_path / "report" / "results.json").read_text())["models"][0]
    assert row["n_kv_heads"] == row["n_heads"] == 8
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]
    want, _, _ = strided_perplexity(model, ids, rec["max_length"], rec["stride"])
    assert row["token_perplexity"] == pytest.approx(want, rel=1e-4)

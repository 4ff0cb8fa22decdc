"""Sliding-window perplexity against transformers' own loss and an unbatched implementation of the HF guide."""

from __future__ import annotations

import math
import re

import pytest
import torch

from attnconv.errors import AttnconvError
from attnconv.eval.perplexity import perplexity, plan_windows, text_stats, tokenize_corpus
from attnconv.loading import load_causal_lm, load_tokenizer
from attnconv.testing import build_tiny_model
from attnconv.textdata import WIKITEXT2_TEST


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = build_tiny_model("llama", tmp_path_factory.mktemp("ppl") / "m", with_tokenizer=True, hidden=32,
                            n_heads=4, n_kv_heads=2)
    model = load_causal_lm(path, "float32")
    tokenizer = load_tokenizer(path)
    raw = WIKITEXT2_TEST.read_text(encoding="utf-8")[:1300]
    texts = [raw[:700], raw[700:]]  # two documents, joined by a blank line
    ids = tokenize_corpus(tokenizer, texts)
    return model, tokenizer, texts, ids


def guide_loop(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The HF perplexity guide's loop, one window at a time, with the exact count of tokens each loss averages."""
    encodings = ids[None]
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = encodings[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        n_loss = int((target_ids[:, 1:] != -100).sum())  # transformers shifts labels left by one
        if n_loss:
            with torch.no_grad():
                loss = model(input_ids, labels=target_ids).loss
            nll_sum += loss.item() * n_loss
            n_tokens += n_loss
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


def test_corpus_is_one_stream_joined_by_blank_lines(setup):
    _, tokenizer, texts, ids = setup
    assert ids.tolist() == tokenizer(texts[0] + "\n\n" + texts[1])["input_ids"]


def test_disjoint_windows_equal_transformers_mean_loss(setup):
    model, _, texts, ids = setup
    L = 64
    res = perplexity(model, ids, text_stats(texts), max_length=L, stride=L, batch_size=3)
    total, count = 0.0, 0
    for begin in range(0, len(ids), L):
        chunk = ids[begin:begin + L][None]  # [1, <=L]
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(chunk, labels=chunk).loss
        total += loss.item() * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    assert res.n_tokens == count
    assert res.token_perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("max_length,stride", [(50, 25), (40, 13)])
def test_strided_windows_equal_the_guide_loop(setup, max_length, stride):
    model, _, texts, ids = setup
    res = perplexity(model, ids, text_stats(texts), max_length=max_length, stride=stride, batch_size=4)
    nll, n = guide_loop(model, ids, max_length, stride)
    assert res.n_tokens == n == len(ids) - 1  # every token but the first is scored exactly once
    assert res.nll_sum == pytest.approx(nll, rel=1e-5)
    assert res.token_perplexity == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_batch_sizes_agree(setup):
    model, _, texts, ids = setup
    ids = ids[:251]  # a last window shorter than the others
    stats = text_stats(texts)
    one = perplexity(model, ids, stats, max_length=48, stride=20, batch_size=1)
    three = perplexity(model, ids, stats, max_length=48, stride=20, batch_size=3)
    assert one.n_windows == three.n_windows == len(plan_windows(251, 48, 20))
    assert one.n_tokens == three.n_tokens == 250
    assert three.nll_sum == pytest.approx(one.nll_sum, rel=1e-5)


def test_word_and_byte_perplexity_follow_from_the_same_nll(setup):
    model, _, texts, ids = setup
    res = perplexity(model, ids, text_stats(texts), max_length=64, stride=32, batch_size=2)
    n_words = sum(len(re.split(r"\s+", t)) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert (res.n_words, res.n_bytes) == (n_words, n_bytes)
    assert math.log(res.word_perplexity) * n_words == pytest.approx(math.log(res.token_perplexity) * res.n_tokens)
    assert math.log(res.byte_perplexity) * n_bytes == pytest.approx(res.nll_sum)
    assert res.bits_per_byte == pytest.approx(math.log2(res.byte_perplexity))
    assert res.to_dict()["word_perplexity"] == res.word_perplexity


def test_windows_score_every_token_once():
    for n, L, S in [(10, 4, 4), (10, 4, 1), (100, 16, 7), (5, 16, 8), (33, 8, 8), (17, 2, 1)]:
        windows = plan_windows(n, L, S)
        scored = [t for w in windows for t in range(w.end - w.n_scored, w.end)]
        # Overlapping windows give every token but the first a context; disjoint ones lose each window's first.
        unscored = {0} if S < L else set(range(0, n, L))
        assert sorted(scored) == sorted(set(range(n)) - unscored)
        assert all(w.length <= L and w.n_scored < w.length for w in windows)


@pytest.mark.parametrize("n,L,S", [(100, 1, 1), (100, 8, 9), (100, 8, 0), (1, 8, 4)])
def test_bad_windows_are_refused(n, L, S):
    with pytest.raises(AttnconvError):
        plan_windows(n, L, S)

"""KL(source || model), top-1 agreement and perplexity ratio, against direct computations on full logits."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from attnconv.eval.agreement import agreement, reference_logits
from attnconv.eval.perplexity import perplexity, text_stats, tokenize_corpus
from attnconv.loading import load_causal_lm, load_tokenizer
from attnconv.testing import build_tiny_model
from attnconv.textdata import tinyshakespeare_split


def average_kv_heads(mha, n_kv: int):
    """A GQA copy of a Llama MHA model: each group's K and V projections replaced by their mean."""
    config = mha.config.__class__.from_dict({**mha.config.to_dict(), "num_key_value_heads": n_kv})
    gqa = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = mha.state_dict()
    n_heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    for name, w in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = w.view(n_kv, n_heads // n_kv, head_dim, -1).mean(1).reshape(n_kv * head_dim, -1)
    gqa.load_state_dict(state)
    return gqa


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = build_tiny_model("llama", tmp_path_factory.mktemp("agree") / "mha", with_tokenizer=True, hidden=32,
                            n_heads=4, init_std=0.3)
    mha = load_causal_lm(path, "float32")
    texts = [tinyshakespeare_split("test")[:900]]
    ids = tokenize_corpus(load_tokenizer(path), texts)
    return mha, average_kv_heads(mha, 2), texts, ids


def test_model_against_itself(setup):
    mha, _, texts, ids = setup
    stats = text_stats(texts)
    res = agreement(mha, mha, ids, stats, max_length=48, stride=16, batch_size=3)
    alone = perplexity(mha, ids, stats, max_length=48, stride=16, batch_size=3)
    assert res.n_tokens == alone.n_tokens == len(ids) - 1
    assert res.kl == pytest.approx(0.0, abs=1e-7)
    assert res.top1_agreement == 1.0
    assert res.ppl_ratio == pytest.approx(1.0, abs=1e-9)
    assert res.model.token_perplexity == pytest.approx(alone.token_perplexity, rel=1e-6)


def test_gqa_against_its_mha_source_matches_direct_computation(setup):
    mha, gqa, texts, ids = setup
    L = 40
    res = agreement(gqa, mha, ids, text_stats(texts), max_length=L, stride=L, batch_size=2)
    # Independent: full logits of both models on the same disjoint windows, KL from torch.distributions.
    kl, match, nll_m, nll_s, n = 0.0, 0, 0.0, 0.0, 0
    for begin in range(0, len(ids), L):
        chunk = ids[begin:begin + L][None]
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            out_s, out_m = mha(chunk, labels=chunk), gqa(chunk, labels=chunk)
        src = torch.distributions.Categorical(logits=out_s.logits[0, :-1])
        mod = torch.distributions.Categorical(logits=out_m.logits[0, :-1])
        kl += torch.distributions.kl_divergence(src, mod).sum().item()
        match += (out_s.logits[0, :-1].argmax(-1) == out_m.logits[0, :-1].argmax(-1)).sum().item()
        nll_s += out_s.loss.item() * (chunk.shape[1] - 1)
        nll_m += out_m.loss.item() * (chunk.shape[1] - 1)
        n += chunk.shape[1] - 1
    assert res.n_tokens == n
    assert res.kl > 1e-4
    assert res.kl == pytest.approx(kl / n, rel=1e-4)
    assert res.top1_matches == match
    assert res.top1_agreement < 1.0
    assert res.ppl_ratio == pytest.approx(math.exp((nll_m - nll_s) / n), rel=1e-5)
    assert res.ppl_ratio == pytest.approx(res.model.token_perplexity / res.source.token_perplexity, rel=1e-9)
    assert res.source.token_perplexity == pytest.approx(math.exp(nll_s / n), rel=1e-5)


def test_cached_source_logits_give_the_same_figures(setup):
    """One run of the source (reference_logits) compared with the model equals running both in lockstep."""
    mha, gqa, texts, ids = setup
    window = dict(max_length=40, stride=24, batch_size=2)
    live = agreement(gqa, mha, ids, text_stats(texts), **window)
    cached = agreement(gqa, reference_logits(mha, ids, **window), ids, text_stats(texts), **window)
    assert live.kl > 1e-4 and live.top1_agreement < 1.0
    assert cached.to_dict() == pytest.approx(live.to_dict(), rel=1e-6)
    assert cached.source.token_perplexity == pytest.approx(live.source.token_perplexity, rel=1e-6)

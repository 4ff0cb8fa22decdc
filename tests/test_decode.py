"""attnconv's greedy decode loop against transformers (generate(), eager forward) and its benchmark's figures."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, MistralConfig

from attnconv.errors import AttnconvError
from attnconv.eval.decode import decode_benchmark, greedy_generate
from attnconv.families import cache_shape
from attnconv.loading import load_causal_lm
from attnconv.patches.decode_attention import sdpa_gqa_attention
from attnconv.patches.decode_cache import PreallocatedKVCache, PreallocatedLayer
from attnconv.testing import build_tiny_model

# (family, n_kv_heads) with 4 query heads: MHA, GQA and MQA; qwen2 has q/k/v biases, qwen3 q/k norms.
MODELS = [("llama", 4), ("llama", 2), ("llama", 1), ("qwen2", 2), ("qwen2", 1), ("qwen3", 4), ("qwen3", 1),
          ("mistral", 2), ("gemma", 1), ("phi3", 2)]
PROMPT, NEW = 9, 7


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("decode")
    paths = {}

    def get(family, n_kv, **kw):
        key = (family, n_kv, tuple(sorted(kw.items())))
        if key not in paths:
            paths[key] = build_tiny_model(family, root / f"{family}-{n_kv}-{len(paths)}", n_kv_heads=n_kv,
                                          init_std=0.3, **kw)
        return paths[key]
    return get


def prompts(batch, length=PROMPT, vocab=256, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,n_kv,batch", [(f, n, 3) for f, n in MODELS] + [("llama", 2, 1), ("qwen2", 1, 1)])
def test_greedy_tokens_equal_generate(tiny, family, n_kv, batch):
    model = load_causal_lm(tiny(family, n_kv), dtype="float32")
    ids = prompts(batch, seed=batch)
    ours = greedy_generate(model, ids, NEW)
    theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    assert theirs.shape == (batch, PROMPT + NEW)
    assert torch.equal(ours.tokens, theirs[:, PROMPT:])
    assert model.config._attn_implementation == "sdpa"  # the loop restores the model's own attention
    # independent check: an eager (repeat_kv + softmax) forward over the whole sequence predicts the same tokens
    eager = load_causal_lm(tiny(family, n_kv), dtype="float32", attn_implementation="eager")
    with torch.no_grad():
        full = eager(torch.cat([ids, ours.tokens[:, :-1]], dim=1)).logits  # [b, s + new - 1, vocab]
    assert torch.equal(full[:, PROMPT - 1:].argmax(-1), ours.tokens)


@pytest.mark.parametrize("family,n_kv", [("llama", 2), ("qwen2", 1), ("mistral", 1)])
def test_left_padded_prompts_match_generate_and_unpadded_runs(tiny, family, n_kv):
    model = load_causal_lm(tiny(family, n_kv), dtype="float32")
    ids = prompts(3)
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :1] = 0, 0  # rows 0 and 2 are shorter prompts, left-padded
    ids = ids.masked_fill(mask == 0, 0)
    ours = greedy_generate(model, ids, NEW, attention_mask=mask)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert torch.equal(ours.tokens, theirs[:, PROMPT:])
    for row in range(3):  # each row continues exactly as its unpadded prompt alone
        alone = greedy_generate(model, ids[row:row + 1, int((mask[row] == 0).sum()):], NEW)
        assert torch.equal(alone.tokens[0], ours.tokens[row])


@pytest.mark.parametrize("family,n_kv", [("llama", 2), ("qwen2", 1), ("qwen3", 1), ("gemma", 1), ("phi3", 2)])
def test_prefill_logits_match_eager_forward(tiny, family, n_kv):
    model = load_causal_lm(tiny(family, n_kv), dtype="float32")
    eager = load_causal_lm(tiny(family, n_kv), dtype="float32", attn_implementation="eager")
    ids = prompts(2, length=12)
    ours = greedy_generate(model, ids, 1, keep_prefill_logits=True)
    with torch.no_grad():
        ref = eager(ids).logits
    assert ours.prefill_logits.shape == ref.shape == (2, 12, 256)
    torch.testing.assert_close(ours.prefill_logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_cache_is_preallocated_unrepeated_and_measured_bytes_match_theory(tiny, n_kv):
    model = load_causal_lm(tiny("llama", n_kv), dtype="float32")
    run = greedy_generate(model, prompts(3), NEW)
    shape = cache_shape(model.config)
    assert run.kv_bytes == shape.bytes(3, PROMPT + NEW, dtype_bytes=4)
    assert run.kv_bytes == 2 * 2 * 3 * n_kv * 16 * (PROMPT + NEW) * 4  # layers x K,V x b x n_kv x d x tokens x fp32
    cache = PreallocatedKVCache(model.config, 3, 40, torch.float32, "cpu")
    assert all(layer.keys.shape == (3, n_kv, 16, 40) for layer in cache.layers)  # CPU: stored transposed
    assert all(layer.filled(40)[1].shape == (3, n_kv, 40, 16) for layer in cache.layers)
    rows = PreallocatedKVCache(model.config, 3, 40, torch.float32, "cpu", keys_as_rows=True)
    assert all(layer.keys.shape == (3, n_kv, 40, 16) and layer.values.shape == (3, n_kv, 16, 40)
               for layer in rows.layers)


@pytest.mark.parametrize("keys_as_rows", [False, True])
@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_decode_attention_over_transposed_cache_equals_sdpa(n_kv, keys_as_rows):
    """The CPU decode step's two products give SDPA's output, with and without a padding keep-mask; with keys
    kept as rows the scores come from attnconv's kernel."""
    from attnconv.kernels.cpu_decode import unavailable_reason

    if keys_as_rows and unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    b, h, d, k = 3, 4, 16, 37
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, 1, d, generator=gen)
    layer = PreallocatedLayer(b, n_kv, 50, d, torch.float32, "cpu", keys_as_rows=keys_as_rows)
    layer.update(torch.randn(b, n_kv, k - 1, d, generator=gen), torch.randn(b, n_kv, k - 1, d, generator=gen))
    key, value = layer.update(torch.randn(b, n_kv, 1, d, generator=gen), torch.randn(b, n_kv, 1, d, generator=gen))
    assert key.shape == (b, n_kv, k, d) and (key.stride(-1) == 1) == keys_as_rows and value.stride(-1) != 1
    keep = torch.rand(b, 1, 1, k, generator=gen) > 0.3
    keep[..., -1] = True
    for mask in (None, keep):
        out, _ = sdpa_gqa_attention(None, q, key, value, mask)  # [b, 1, h, d]
        want = F.scaled_dot_product_attention(q, key.contiguous(), value.contiguous(), attn_mask=mask,
                                              enable_gqa=True)  # [b, h, 1, d]
        torch.testing.assert_close(out, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_sliding_window_prefill_and_decode_match_eager():
    """A prompt longer than Mistral's window takes the masked prefill; decode steps slice the window."""
    config = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                           max_position_embeddings=64, initializer_range=0.3)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    ids = prompts(2, length=10, vocab=128)
    ours = greedy_generate(model, ids, 8, keep_prefill_logits=True)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        full = model(torch.cat([ids, ours.tokens[:, :-1]], dim=1)).logits
    torch.testing.assert_close(ours.prefill_logits, full[:, :10], rtol=1e-5, atol=1e-5)
    assert torch.equal(full[:, 9:].argmax(-1), ours.tokens)
    # and without the window the continuation is a different one: the test can see a missing window
    config.sliding_window = None
    unwindowed = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    unwindowed.load_state_dict(model.state_dict())
    with torch.no_grad():
        other = unwindowed(torch.cat([ids, ours.tokens[:, :-1]], dim=1)).logits
    assert not torch.allclose(other[:, 9:], full[:, 9:], atol=1e-4)


def test_refuses_unsupported_family_and_too_long_runs(tiny):
    gpt2 = load_causal_lm(tiny("gpt2", 4), dtype="float32")
    with pytest.raises(AttnconvError, match="does not support model type 'gpt2'"):
        greedy_generate(gpt2, prompts(1), 2)
    llama = load_causal_lm(tiny("llama", 2, max_positions=16), dtype="float32")
    with pytest.raises(AttnconvError, match="exceed the model's 16 positions"):
        greedy_generate(llama, prompts(1, length=12), 5)


ROW_KEYS = {"impl", "batch", "context", "prefill_s", "tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "runs",
            "ms_per_token", "kv_bytes_theoretical", "kv_bytes_measured", "peak_mem_bytes", "roofline_tokens_per_s",
            "bandwidth_fraction"}


def test_decode_benchmark_tiny_grid(tiny, monkeypatch):
    import transformers.utils.generic as hf_generic

    deprecated = []
    monkeypatch.setattr(hf_generic.logger, "warning_once", lambda msg, *a, **k: deprecated.append(msg))
    model = load_causal_lm(tiny("llama", 2, max_positions=64), dtype="float32")
    new = 4
    result = decode_benchmark(model, contexts=(8, 100), batches=(1, 2), new_tokens=new, repeats=3)
    assert set(result) == {"rows", "notes", "bandwidth_bytes_per_s"}
    assert any("context 100 clamped to 60" in n for n in result["notes"])
    assert "greedy tokens equal generate()'s at every grid point" in result["notes"]
    bandwidth = result["bandwidth_bytes_per_s"]
    assert 1e8 < bandwidth < 1e14
    rows = result["rows"]
    assert [(r["impl"], r["batch"], r["context"]) for r in rows] == [
        (impl, b, c) for b in (1, 2) for c in (8, 60) for impl in ("attnconv", "hf-static", "hf-dynamic")]
    weights = sum(p.nbytes for n, p in model.named_parameters() if "embed_tokens" not in n)
    per_token = cache_shape(model.config).bytes_per_token(4)
    for r in rows:
        assert set(r) == ROW_KEYS
        b, c = r["batch"], r["context"]
        assert r["prefill_s"] > 0 and r["tokens_per_s"] > 0 and r["runs"] == 3
        assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
        assert r["ms_per_token"] == pytest.approx(1000 * b / r["tokens_per_s"])
        assert r["kv_bytes_theoretical"] == b * (c + new) * per_token
        assert r["peak_mem_bytes"] > 0
        step_bytes = weights + b * (c + new / 2) * per_token
        assert r["roofline_tokens_per_s"] == pytest.approx(b * bandwidth / step_bytes)
        assert r["bandwidth_fraction"] == pytest.approx(r["tokens_per_s"] / r["roofline_tokens_per_s"])
        if r["impl"] == "attnconv":
            assert r["kv_bytes_measured"] == r["kv_bytes_theoretical"]
        if r["impl"] == "hf-dynamic":  # the last token is never fed back, so never cached
            assert r["kv_bytes_measured"] == b * (c + new - 1) * per_token
    assert not deprecated, deprecated  # the current transformers names only (the old ones warn on stderr)
    only_ours = decode_benchmark(model, contexts=(8,), batches=(1,), new_tokens=2, baseline=False)
    assert [r["impl"] for r in only_ours["rows"]] == ["attnconv"]
    with pytest.raises(AttnconvError, match="at least 2 new tokens"):
        decode_benchmark(model, contexts=(8,), batches=(1,), new_tokens=1)


def test_packed_linears_match_nn_linear_and_restore():
    from attnconv.patches.decode_linear import available, packed_linears

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.Linear(53, 11, bias=False))
    if not available(net):
        pytest.skip("this torch build has no oneDNN linear")
    for shape in [(1, 37), (8, 37), (3, 5, 37), (2, 1, 37)]:
        x = torch.randn(shape)
        want = net(x)
        with torch.inference_mode(), packed_linears(net) as n:
            got = net(x)
        assert n == 2 and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all("forward" not in m.__dict__ for m in net)  # the modules' own forward is back
    with torch.no_grad():
        net[0].weight.mul_(2)  # a changed weight is packed again
    x = torch.randn(4, 37)
    want = net(x)
    with torch.inference_mode(), packed_linears(net):
        torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)

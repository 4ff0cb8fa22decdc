"""attnconv's decode loop on DeepseekV3 (MLA) checkpoints: latent cache, absorbed steps, against transformers' own
unabsorbed forward and generate()."""

from __future__ import annotations

import pytest
import torch

from attnconv.eval.decode import check_supported, decode_benchmark, greedy_generate
from attnconv.families import cache_shape
from attnconv.loading import load_causal_lm
from attnconv.patches import deepseek_v3
from attnconv.patches.decode_cache import LatentKVCache

PROMPT, NEW, VOCAB = 9, 7, 256
# name -> DeepseekV3 attention settings: q_lora_rank null or set; r + d_r a multiple of 8 (AVX2 scores kernel on
# CPU float32) or not (torch); interleaved RoPE pairs (the engines' layout) or halves
VARIANTS = {
    "q-full": dict(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8),
    "q-lora": dict(q_lora_rank=24, kv_lora_rank=24, qk_rope_head_dim=16),
    "odd-rank": dict(q_lora_rank=None, kv_lora_rank=12, qk_rope_head_dim=6),
    "rope-halves": dict(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, rope_interleave=False),
}


def deepseek_config(q_lora_rank, kv_lora_rank, qk_rope_head_dim, rope_interleave=True, hidden=64, heads=4):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=2, first_k_dense_replace=2, n_routed_experts=4, num_attention_heads=heads,
        num_key_value_heads=heads,
        q_lora_rank=q_lora_rank, kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim, qk_nope_head_dim=16,
        v_head_dim=12, rope_interleave=rope_interleave, max_position_embeddings=512, initializer_range=0.3,
        tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """variant -> a saved tiny DeepseekV3ForCausalLM with random norms (a norm left out would show)."""
    from transformers import AutoModelForCausalLM

    root, paths = tmp_path_factory.mktemp("mla"), {}

    def get(variant):
        if variant not in paths:
            torch.manual_seed(len(paths))
            model = AutoModelForCausalLM.from_config(deepseek_config(**VARIANTS[variant]), dtype=torch.float32)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.add_(torch.randn_like(p) * 0.2)
            paths[variant] = root / variant
            model.save_pretrained(paths[variant])
        return paths[variant]
    return get


def prompts(batch, padded: bool, seed=0):
    ids = torch.randint(0, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0
        mask[-1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def step_logits(model, ids, mask):
    """greedy_generate's result and the logits of every forward it ran (prefill's last position, then each step)."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out[:, -1].clone()))
    try:
        result = greedy_generate(model, ids, NEW, attention_mask=mask)
    finally:
        hook.remove()
    return result, torch.stack(seen, dim=1)  # [b, NEW, vocab]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("padded", [False, True])
def test_absorbed_decode_logits_equal_the_unabsorbed_forward(checkpoint, variant, padded):
    """Each step's logits against transformers' own forward (eager: K/V expanded from the latent, softmax) over the
    prompt and the tokens generated so far, left padding and its positions included."""
    model = load_causal_lm(checkpoint(variant), dtype="float32")
    eager = load_causal_lm(checkpoint(variant), dtype="float32", attn_implementation="eager")
    ids, mask = prompts(3, padded)
    result, ours = step_logits(model, ids, mask)
    full_ids = torch.cat([ids, result.tokens[:, :-1]], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(result.tokens[:, :-1])], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() and the loop number left-padded tokens
    with torch.no_grad():
        ref = eager(full_ids, attention_mask=full_mask, position_ids=positions).logits[:, PROMPT - 1:]
    assert ref.abs().max() > 1  # logits of a real spread: the bound below means something
    assert (ours - ref).abs().max() <= 1e-4
    assert torch.equal(ours.argmax(-1), result.tokens)


@pytest.mark.parametrize("variant,kernel", [("q-full", "auto"), ("q-lora", "auto"), ("odd-rank", "auto"),
                                            ("q-lora", "torch")])
def test_greedy_tokens_equal_generate_with_left_padding(checkpoint, variant, kernel):
    model = load_causal_lm(checkpoint(variant), dtype="float32")
    ids, mask = prompts(3, padded=True, seed=1)
    ours = greedy_generate(model, ids, NEW, attention_mask=mask, kernel=kernel)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert torch.equal(ours.tokens, theirs[:, PROMPT:])
    for row in range(3):  # and each row continues exactly as its prompt alone, unpadded
        alone = greedy_generate(model, ids[row:row + 1, int((mask[row] == 0).sum()):], NEW)
        assert torch.equal(alone.tokens[0], ours.tokens[row])


@pytest.mark.parametrize("variant", ["q-full", "odd-rank"])
def test_cache_holds_r_plus_d_r_values_per_token_and_layer(checkpoint, variant):
    model = load_causal_lm(checkpoint(variant), dtype="float32")
    config, settings = model.config, VARIANTS[variant]
    ids, _ = prompts(2, padded=False)
    result = greedy_generate(model, ids, NEW)
    per_token = settings["kv_lora_rank"] + settings["qk_rope_head_dim"]
    assert result.kv_bytes == config.num_hidden_layers * 2 * (PROMPT + NEW) * per_token * 4
    shape = cache_shape(config)
    assert shape.values_per_layer == per_token and shape.bytes(2, PROMPT + NEW, 4) == result.kv_bytes


def test_the_patch_runs_every_step_and_is_undone(checkpoint, monkeypatch):
    from transformers import AttentionInterface

    model = load_causal_lm(checkpoint("q-lora"), dtype="float32")
    calls = []
    real = deepseek_v3.mla_decode_attention
    monkeypatch.setattr(deepseek_v3, "mla_decode_attention", lambda *a: calls.append(a[2].shape) or real(*a))
    check_supported(model)
    greedy_generate(model, prompts(2, padded=False)[0], 4)
    rows = VARIANTS["q-lora"]["kv_lora_rank"] + VARIANTS["q-lora"]["qk_rope_head_dim"]
    assert calls == [(2, PROMPT + step, rows) for step in (1, 2, 3) for _ in range(2)]  # 3 steps x 2 layers
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not [k for k in AttentionInterface._global_mapping if k.startswith("attnconv")]


def test_latent_cache_serves_transformers_own_forward(checkpoint):
    """Without the patch, DeepseekV3's own forward reads and writes the latent cache through `update`."""
    model = load_causal_lm(checkpoint("q-full"), dtype="float32")
    ids, _ = prompts(2, padded=False)
    cache = LatentKVCache(model.config, 2, PROMPT + 1, torch.float32, "cpu")
    with torch.no_grad():
        model(ids[:, :-1], cache=cache)
        step = model(ids[:, -1:], cache=cache).logits[:, -1]
        full = model(ids).logits[:, -1]
    assert cache.get_seq_length() == PROMPT
    # the absorbed step sums in another order than the full forward: a few float32 ulps of logits near 2,
    # which vary with the CPU's vector width (1.05e-5 on an AVX-512 EPYC)
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_bfloat16_decode_stays_close_to_float32(checkpoint):
    """bf16 runs through SDPA over the latent (no CPU kernel): its step logits within bf16 rounding of fp32."""
    ids, _ = prompts(2, padded=False)
    fp32 = step_logits(load_causal_lm(checkpoint("q-lora"), dtype="float32"), ids, None)[1]
    bf16 = step_logits(load_causal_lm(checkpoint("q-lora"), dtype="bfloat16"), ids, None)[1]
    assert (bf16[:, 0].float() - fp32[:, 0]).abs().max() <= 0.05 * fp32.abs().max()


def test_decode_benchmark_counts_the_latent(checkpoint):
    model = load_causal_lm(checkpoint("q-full"), dtype="float32")
    report = decode_benchmark(model, contexts=(16,), batches=(2,), new_tokens=3, progress=False)
    by = {r["impl"]: r for r in report["rows"]}
    theory = 2 * 2 * (16 + 3) * (16 + 8) * 4  # layers x batch x tokens x (r + d_r) x bytes
    assert by["attnconv"]["kv_bytes_theoretical"] == by["attnconv"]["kv_bytes_measured"] == theory
    # transformers caches the same latent rows, all but the last token (generated, never fed back)
    assert by["hf-dynamic"]["kv_bytes_measured"] == theory // (16 + 3) * (16 + 3 - 1)
    assert "greedy tokens equal generate()'s at every grid point" in report["notes"]


def test_info_shows_the_latent_cache(cli, checkpoint):
    code, out, err = cli("info", checkpoint("q-full"), "--batch", "2", "--context", "64", "--dtype", "float32")
    assert code == 0, err
    assert "MLA latent + RoPE keys 24 values per token and layer" in out
    assert "this model" in out and "for comparison" in out


def test_prefill_in_chunks_then_steps_equals_one_forward(checkpoint):
    """A second prefill chunk attends to the cached rows (expanded) and its own, causally: the same logits as one
    forward over the whole sequence."""
    model = load_causal_lm(checkpoint("q-lora"), dtype="float32")
    ids, _ = prompts(2, padded=False)
    cache = LatentKVCache(model.config, 2, PROMPT, torch.float32, "cpu")
    with torch.no_grad(), deepseek_v3.mla_decode(model) as patched:
        first = model(ids[:, :4], cache=cache).logits
        second = model(ids[:, 4:-1], cache=cache).logits
        last = model(ids[:, -1:], cache=cache).logits
    full = model(ids).logits
    assert patched == 2
    torch.testing.assert_close(torch.cat([first, second, last], dim=1), full, atol=1e-4, rtol=0)


def test_prefill_gives_sdpa_one_head_size(checkpoint, monkeypatch):
    """With value heads narrower than query/key heads, torch's CPU SDPA falls back to the math kernel, whose
    [b, H, s, s] scores exhaust memory on long prompts (25.8 GB at 8 x 8192 tokens of 12 heads): prefill pads."""
    import torch.nn.functional as F

    model = load_causal_lm(checkpoint("q-lora"), dtype="float32")
    config = model.config
    assert config.v_head_dim != config.qk_nope_head_dim + config.qk_rope_head_dim
    sizes, real = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        sizes.append((q.shape[-1], k.shape[-1], v.shape[-1]))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    greedy_generate(model, prompts(2, padded=False)[0], 2)
    assert sizes and all(len(set(s)) == 1 for s in sizes)

"""attnconv's decode loop on MLA checkpoints in attnconv's own format (models/mla.py): a cache of the latent and
the RoPE keys per KV head, absorbed one-token steps, against the model's own unabsorbed forward, generate(), the
lossless source model and the family record's cache size."""

from __future__ import annotations

import json

import pytest
import torch

import attnconv  # noqa: F401  (registers the attnconv MLA classes with transformers)
from attnconv.convert.api import convert
from attnconv.convert.settings import ConvertSettings
from attnconv.errors import AttnconvError
from attnconv.eval.decode import check_supported, greedy_generate, unsupported_reason
from attnconv.families import cache_shape
from attnconv.kernels.mla_attention import grouped_mla_decode_attention, grouped_mla_decode_reference
from attnconv.loading import load_causal_lm
from attnconv.patches import attnconv_mla
from attnconv.testing import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT, NEW, HEAD = 9, 7, 16  # tiny sources: hidden 64, 4 query heads of 16, 2 KV heads
PHI3 = {"partial_rotary_factor": 0.5}  # 8 of 16 dims rotate: the latent carries NoPE key dims at every rope_dim
QWEN2_WINDOW = {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1}  # layer 1 windowed
MISTRAL_WINDOW = {"sliding_window": 5}
# name -> (family, kv_rank, rope_dim, source config extras). "full": the latent at full rank n_kv x (2 head_dim -
# rope_dim), so NoPE keys and values are exact; "lossless": every RoPE pair kept too, so the source model is a
# reference as well. Ranks and RoPE sizes that are multiples of 8 run the fused CPU kernel, the others torch's path.
VARIANTS = {
    "llama-16": ("llama", 16, 8, None), "llama-full": ("llama", 48, 8, None),
    "llama-lossless": ("llama", 32, 16, None),
    "mistral-16": ("mistral", 16, 8, MISTRAL_WINDOW), "mistral-full": ("mistral", 48, 8, MISTRAL_WINDOW),
    "qwen2-20": ("qwen2", 20, 4, QWEN2_WINDOW), "qwen2-full": ("qwen2", 56, 4, QWEN2_WINDOW),
    "qwen3-16": ("qwen3", 16, 8, None), "qwen3-full": ("qwen3", 48, 8, None),
    "qwen3-lossless": ("qwen3", 32, 16, None),
    "gemma-12": ("gemma", 12, 4, None), "gemma-full": ("gemma", 56, 4, None),
    "phi3-16": ("phi3", 16, 4, PHI3), "phi3-full": ("phi3", 48, 8, PHI3),  # full keeps all 8 rotary dims: lossless
    # --rope-key shared: one RoPE key for all heads, a full NoPE key and a latent block per query head
    "llama-shared": ("llama", 16, 8, None), "qwen2-shared": ("qwen2", 20, 4, QWEN2_WINDOW),
    "phi3-shared": ("phi3", 24, 4, PHI3), "gemma-shared": ("gemma", 12, 8, None),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """variant -> (source folder, converted attnconv-format MLA folder), built on first use."""
    root, paths = tmp_path_factory.mktemp("mla-fmt"), {}

    def get(variant):
        if variant not in paths:
            family, rank, rope_dim, extra = VARIANTS[variant]
            src = build_tiny_model(family, root / variant / "src", n_heads=4, n_kv_heads=2, extra=extra)
            convert(ConvertSettings(src, root / variant / "mla", to="mla", format="attnconv", kv_rank=rank,
                                    rope_dim=rope_dim, init="svd", phases=False,
                                    rope_key="shared" if variant.endswith("shared") else "per-kv-head"),
                    progress=False)
            paths[variant] = src, root / variant / "mla"
        return paths[variant]
    return get


def prompts(batch, padded: bool, seed=0):
    ids = torch.randint(0, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :4] = 0
        mask[-1, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def step_logits(model, ids, mask, kernel="auto"):
    """greedy_generate's result and the logits of every forward it ran (prefill's last position, then each step)."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out[:, -1].clone()))
    try:
        result = greedy_generate(model, ids, NEW, attention_mask=mask, kernel=kernel)
    finally:
        hook.remove()
    return result, torch.stack(seen, dim=1)  # [b, NEW, vocab]


def full_forward(model, ids, mask, tokens):
    """The model's logits over prompt + generated tokens in one forward, at the positions the loop numbers."""
    full_ids = torch.cat([ids, tokens[:, :-1]], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(tokens[:, :-1])], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(full_ids, attention_mask=full_mask, position_ids=positions).logits[:, PROMPT - 1:]


def without_window(model):
    """MODEL with its sliding windows wider than any test sequence (to show a test sees them)."""
    model.config.sliding_window = 1024
    for module in attnconv_mla.mla_modules(model):
        if module.sliding_window is not None:
            module.sliding_window = 1024
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_absorbed_steps_equal_the_models_own_forward(checkpoint, variant, monkeypatch):
    """Each step's logits against the model's own eager forward (NoPE keys and values rebuilt from the latent)
    over the prompt and the tokens generated so far, left padding, its positions and sliding windows included."""
    path = checkpoint(variant)[1]
    model = load_causal_lm(path, dtype="float32")
    eager = load_causal_lm(path, dtype="float32", attn_implementation="eager")
    steps = []
    for kernel in ("grouped_mla_decode_attention", "mla_decode_attention"):  # per-KV-head / shared RoPE keys
        real = getattr(attnconv_mla, kernel)
        monkeypatch.setattr(attnconv_mla, kernel, lambda *a, real=real: steps.append(1) or real(*a))
    ids, mask = prompts(3, padded=True)
    result, ours = step_logits(model, ids, mask)
    ref = full_forward(eager, ids, mask, result.tokens)
    assert len(steps) == (NEW - 1) * model.config.num_hidden_layers  # every one-token step ran absorbed
    assert ref.abs().max() > 1  # logits of a real spread: the bound below means something
    assert (ours - ref).abs().max() <= 1e-4
    assert torch.equal(ours.argmax(-1), result.tokens)
    if VARIANTS[variant][3] in (MISTRAL_WINDOW, QWEN2_WINDOW):  # PROMPT + NEW > window: the window matters
        assert (full_forward(without_window(eager), ids, mask, result.tokens) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_tokens_equal_generate_with_left_padding(checkpoint, variant):
    src, path = checkpoint(variant)
    model = load_causal_lm(path, dtype="float32")
    ids, mask = prompts(3, padded=True, seed=1)
    ours = greedy_generate(model, ids, NEW, attention_mask=mask)
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.tokens, model.generate(ids, **kwargs)[:, PROMPT:])
    if variant.endswith("lossless") or variant == "phi3-full":  # the source model continues the same way
        source = load_causal_lm(src, dtype="float32")
        assert torch.equal(ours.tokens, source.generate(ids, **kwargs)[:, PROMPT:])
    alone = greedy_generate(model, ids[:1, 4:], NEW)  # the padded row continues as its prompt alone
    assert torch.equal(alone.tokens[0], ours.tokens[0])


@pytest.mark.parametrize("variant", ["llama-16", "qwen2-20", "qwen3-16", "phi3-full", "qwen2-shared"])
def test_cache_bytes_equal_the_family_record(checkpoint, variant):
    family, rank, rope_dim, _ = VARIANTS[variant]
    model = load_causal_lm(checkpoint(variant)[1], dtype="float32")
    result = greedy_generate(model, prompts(2, padded=False)[0], NEW)
    rope_keys = 1 if variant.endswith("shared") else 2  # one shared RoPE key, or one per KV head
    per_token = rank + rope_keys * rope_dim + (2 if family == "qwen3" else 0)  # latent + RoPE keys (+ 1/rms)
    assert result.kv_bytes == model.config.num_hidden_layers * 2 * (PROMPT + NEW) * per_token * 4
    assert cache_shape(model.config).bytes(2, PROMPT + NEW, 4) == result.kv_bytes


def test_the_patch_is_undone(checkpoint):
    from transformers import AttentionInterface

    model = load_causal_lm(checkpoint("qwen3-16")[1], dtype="float32")
    ids, _ = prompts(2, padded=False)
    with torch.no_grad():
        before = model(ids).logits
    greedy_generate(model, ids, 4)
    assert model.config._attn_implementation == "sdpa"
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not [k for k in AttentionInterface._global_mapping if k.startswith("attnconv")]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_prefill_in_chunks_then_steps_equals_one_forward(checkpoint):
    """A second prefill chunk attends to the cached tokens and its own, causally; then absorbed steps."""
    model = load_causal_lm(checkpoint("qwen2-20")[1], dtype="float32")
    ids, _ = prompts(2, padded=False)
    cache = attnconv_mla.RopeLatentKVCache(model, 2, PROMPT, torch.float32, "cpu")
    with torch.no_grad(), attnconv_mla.attnconv_mla_decode(model) as patched:
        chunks = [model(ids[:, :4], cache=cache).logits, model(ids[:, 4:-2], cache=cache).logits]
        chunks += [model(ids[:, t:t + 1], cache=cache).logits for t in (PROMPT - 2, PROMPT - 1)]
    full = model(ids).logits
    assert patched == 2 and cache.get_seq_length() == PROMPT
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-4, rtol=0)


def test_the_cache_serves_the_models_own_forward(checkpoint):
    model = load_causal_lm(checkpoint("qwen3-16")[1], dtype="float32")
    ids, _ = prompts(2, padded=False)
    cache = attnconv_mla.RopeLatentKVCache(model, 2, PROMPT, torch.float32, "cpu")
    with torch.no_grad():
        model(ids[:, :-1], cache=cache)
        step = model(ids[:, -1:], cache=cache).logits[:, -1]
        full = model(ids).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["llama-16", "qwen3-16", "llama-shared"])
def test_torch_path_and_bfloat16(checkpoint, variant):
    """The torch kernels give the native ones' logits; bf16 (SDPA or torch over the latent) stays within bf16
    rounding of fp32."""
    path = checkpoint(variant)[1]
    ids, mask = prompts(2, padded=True)
    native = step_logits(load_causal_lm(path, dtype="float32"), ids, mask)[1]
    plain = step_logits(load_causal_lm(path, dtype="float32"), ids, mask, kernel="torch")[1]
    assert (plain - native).abs().max() <= 1e-4
    bf16 = step_logits(load_causal_lm(path, dtype="bfloat16"), ids, None)[1]
    fp32 = step_logits(load_causal_lm(path, dtype="float32"), ids, None)[1]
    assert (bf16[:, 0].float() - fp32[:, 0]).abs().max() <= 0.05 * fp32.abs().max()


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("key_scale", [False, True])
def test_grouped_kernel_equals_the_unabsorbed_reference(backend, key_scale):
    """float32, attnconv's CPU kernels or torch, against keys and values expanded per KV head in float64."""
    g = torch.Generator().manual_seed(0)
    b, n_kv, groups, d_nope, d_r, d_v, rank, length = 2, 2, 3, 12, 8, 16, 24, 37

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    args = [rand(b, n_kv, groups, d_nope), rand(b, n_kv, groups, d_r), rand(b, length, rank),
            rand(b, n_kv, length, d_r), rand(n_kv, d_nope, rank) / 4, rand(n_kv, d_v, rank) / 4]
    keep = torch.ones(b, length, dtype=torch.bool)
    keep[0, :5] = False
    scale = rand(b, length, n_kv).abs() + 0.5 if key_scale else None
    ref = grouped_mla_decode_reference(*args, 0.3, keep, scale)
    ours = grouped_mla_decode_attention(*[a.float() for a in args], 0.3, keep,
                                        None if scale is None else scale.float(), backend=backend)
    assert ours.dtype == torch.float32 and ours.shape == (b, n_kv, groups, d_v)
    assert ref.abs().max() > 0.3 and (ours.double() - ref).abs().max() <= 1e-5


def test_unsupported_model_is_refused_and_eval_notes_it(checkpoint, tmp_path, cli):
    """A config without the cache size the family record reads: greedy_generate refuses in one line, and eval's
    decode measurement says "decode not measured" instead of reporting numbers."""
    import shutil

    from attnconv.eval.api import measure_decode
    from attnconv.eval.settings import EvalSettings

    path = tmp_path / "old"
    shutil.copytree(checkpoint("llama-16")[1], path)
    config = json.loads((path / "config.json").read_text())
    del config["kv_cache_dim_per_layer"]
    (path / "config.json").write_text(json.dumps(config))
    model = load_causal_lm(path, dtype="float32")
    assert "kv_cache_dim_per_layer" in unsupported_reason(model)
    with pytest.raises(AttnconvError, match="kv_cache_dim_per_layer"):
        check_supported(model)
    settings = EvalSettings(models=(str(path),), perplexity=False, decode=True, contexts=(8,), batches=(1,),
                            new_tokens=3, quiet=True)
    assert measure_decode(settings, model) == {"rows": [], "notes": [
        f"decode not measured: {unsupported_reason(model)}"]}
    # A command that reads the cache size: one line naming what is missing, no traceback.
    code, _, err = cli("info", path)
    assert code != 0 and "does not say how many values a token caches per layer" in err, (code, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_eval_decode_end_to_end(checkpoint, tmp_path, cli):
    path = checkpoint("qwen3-16")[1]
    out = tmp_path / "out"
    code, stdout, err = cli("eval", path, "--decode", "--no-perplexity", "--contexts", "8,16", "--batches", "2",
                            "--new-tokens", "3", "--dtype", "float32", "--quiet", "--out", out)
    assert code == 0, err
    bench = json.loads((out / "results.json").read_text())["decode"][str(path)]
    rows = {(r["impl"], r["context"]): r for r in bench["rows"]}
    assert set(rows) == {(impl, ctx) for impl in ("attnconv", "hf-dynamic") for ctx in (8, 16)}
    for ctx in (8, 16):
        theory = 2 * 2 * (ctx + 3) * (16 + 2 * 8 + 2) * 4  # layers x batch x tokens x (r + n_kv d_r + n_kv) x fp32
        assert rows["attnconv", ctx]["kv_bytes_measured"] == rows["attnconv", ctx]["kv_bytes_theoretical"] == theory
        assert rows["attnconv", ctx]["tokens_per_s"] > 0
    assert "greedy tokens equal generate()'s at every grid point" in bench["notes"]
    assert any(n.startswith("hf-static not measured") for n in bench["notes"])


def test_ranks_per_layer(tmp_path):
    """Layers of different latent ranks (a calibrated rank allocation): each layer's cache holds its own rank, and
    the total is the family record's (mean over layers) formula."""
    from attnconv.convert.mla.inmemory import to_attnconv_mla

    source = load_causal_lm(build_tiny_model("qwen3", tmp_path / "src", n_heads=4, n_kv_heads=2), dtype="float32")
    model = to_attnconv_mla(source, kv_rank=[16, 40], rope_dim=8, rope_select="high")
    ids, mask = prompts(2, padded=True, seed=2)
    ours = greedy_generate(model, ids, NEW, attention_mask=mask)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert torch.equal(ours.tokens, theirs[:, PROMPT:])
    per_token = (16 + 2 * 8 + 2) + (40 + 2 * 8 + 2)  # both layers: latent + RoPE keys of 2 KV heads + 1/rms
    assert ours.kv_bytes == 2 * (PROMPT + NEW) * per_token * 4 == cache_shape(model.config).bytes(2, PROMPT + NEW, 4)

"""The absorbed MLA decode attention against the unabsorbed computation (K/V expanded from the latent, plain
softmax attention) in float64, for odd shapes, strided cache views, padding masks, both backends and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnconv.kernels import cpu_decode, cpu_mla
from attnconv.kernels.mla_attention import (
    expand_latent,
    grouped_rope_scores,
    latent_attention,
    latent_scores,
    mla_decode_attention,
    mla_decode_reference,
    split_kv_b,
)

# (batch, heads, r, d_r, d_nope, d_v, cached tokens); r + d_r a multiple of 8 except the last (torch only)
SHAPES = [(1, 1, 8, 8, 8, 8, 1), (3, 4, 16, 8, 16, 16, 5), (2, 12, 32, 16, 24, 8, 37), (5, 7, 24, 8, 12, 20, 130),
          (1, 16, 64, 32, 32, 64, 300), (3, 5, 12, 6, 10, 14, 17)]
# max abs error against float64, for outputs of magnitude ~1 (inputs scaled so softmax is not flat)
TOLERANCE = {torch.float32: 5e-6, torch.bfloat16: 4e-2}
NATIVE = cpu_decode.unavailable_reason() is None
BACKENDS = ["native", "torch"] if NATIVE else ["torch"]
# CPU float32 paths: the fused kernel (cpu_mla.c), the scores kernel + torch softmax + BLAS, plain torch
PATHS = (["fused", "scores"] if NATIVE and cpu_mla.available() else []) + ["torch"]


@pytest.fixture
def path(request, monkeypatch) -> str:
    """The backend argument for a CPU path; "scores" hides the fused kernel."""
    if request.param == "scores":
        monkeypatch.setattr(cpu_mla, "available", lambda: False)
    return "torch" if request.param == "torch" else "native"


def make_inputs(batch, heads, rank, rope, nope, v_dim, length, seed=0, spare=3):
    """float64 inputs; the cache rows are a view of a longer buffer, as in the preallocated cache."""
    g = torch.Generator().manual_seed(seed)
    kv_b = torch.randn(heads * (nope + v_dim), rank, generator=g, dtype=torch.float64) / rank ** 0.5
    buffer = torch.randn(batch, length + spare, rank + rope, generator=g, dtype=torch.float64)
    q_nope = torch.randn(batch, heads, nope, generator=g, dtype=torch.float64)
    q_rot = torch.randn(batch, heads, rope, generator=g, dtype=torch.float64)
    keep = torch.rand(batch, length, generator=g) > 0.3
    keep[:, -1] = True  # the new token always sees itself
    return kv_b, buffer[:, :length], q_nope, q_rot, keep


def unabsorbed(q_nope, q_rot, rows, kv_b, heads, nope, v_dim, scale, keep):
    """Expand per-head K/V from the latent with kv_b_proj and attend: [b, H, d_v]. Independent of the kernel."""
    rank = kv_b.shape[1]
    kv = (rows[..., :rank] @ kv_b.T).unflatten(-1, (heads, nope + v_dim)).transpose(1, 2)  # [b, H, L, nope + v]
    k_rot = rows[:, None, :, rank:].expand(-1, heads, -1, -1)
    keys = torch.cat([kv[..., :nope], k_rot], dim=-1)  # [b, H, L, nope + d_r]
    query = torch.cat([q_nope, q_rot], dim=-1)[:, :, None]  # [b, H, 1, nope + d_r]
    scores = (query @ keys.transpose(-1, -2)) * scale  # [b, H, 1, L]
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ kv[..., nope:])[:, :, 0]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_equals_unabsorbed_in_float64(shape):
    batch, heads, rank, rope, nope, v_dim, length = shape
    kv_b, rows, q_nope, q_rot, keep = make_inputs(*shape)
    scale = (nope + rope) ** -0.5 * 3
    w_uk, w_uv = split_kv_b(kv_b, heads, nope, v_dim)
    ref = mla_decode_reference(q_nope, q_rot, rows, w_uk, w_uv, scale, keep)
    expected = unabsorbed(q_nope, q_rot, rows, kv_b, heads, nope, v_dim, scale, keep)
    assert ref.shape == (batch, heads, v_dim)
    torch.testing.assert_close(ref, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_absorbed_decode_matches_unabsorbed(shape, dtype, path, masked):
    batch, heads, rank, rope, nope, v_dim, length = shape
    kv_b, rows, q_nope, q_rot, keep = make_inputs(*shape, seed=length)
    keep = keep if masked else torch.ones_like(keep)
    scale = (nope + rope) ** -0.5 * 3
    expected = unabsorbed(q_nope, q_rot, rows, kv_b, heads, nope, v_dim, scale, keep)
    w_uk, w_uv = split_kv_b(kv_b.to(dtype), heads, nope, v_dim)
    out = mla_decode_attention(q_nope.to(dtype), q_rot.to(dtype), rows.to(dtype), w_uk, w_uv, scale,
                               keep if masked else None, path)
    assert out.dtype == dtype and out.shape == (batch, heads, v_dim)
    err = (out.double() - expected).abs().max().item()
    assert err <= TOLERANCE[dtype], err
    assert expected.abs().max() > 0.3  # outputs of magnitude ~1: the tolerance is a real bound


@pytest.mark.skipif("fused" not in PATHS, reason="attnconv's CPU kernels are not available here")
def test_the_fused_kernel_runs_on_cpu_float32(monkeypatch):
    calls = []
    real = cpu_mla.latent_attention
    monkeypatch.setattr(cpu_mla, "latent_attention", lambda *a: calls.append(a[1].shape) or real(*a))
    kv_b, rows, q_nope, q_rot, _ = make_inputs(2, 6, 16, 8, 8, 8, 9)
    w_uk, w_uv = split_kv_b(kv_b.float(), 6, 8, 8)
    mla_decode_attention(q_nope.float(), q_rot.float(), rows.float(), w_uk, w_uv, 0.3)
    assert calls == [(2, 9, 24)]  # one call: all six heads over the shared rows


@pytest.mark.skipif("fused" not in PATHS, reason="attnconv's CPU kernels are not available here")
@pytest.mark.parametrize("wide", [False, True] if cpu_mla.has_avx512() else [False])
@pytest.mark.parametrize("heads,width,rank,length", [(1, 8, 8, 1), (7, 40, 24, 255), (12, 192, 128, 256),
                                                     (5, 24, 16, 257), (3, 16, 8, 700), (6, 96, 80, 300)])
def test_fused_kernel_against_float64_across_chunk_boundaries(heads, width, rank, length, wide):
    """Chunks of 256 keys merged by their maxima: lengths on both sides of a boundary, a chunk whose keys are all
    masked, extra scores, head counts and ranks off the register blocks (4 heads x 16 or 64 columns), widths that
    are not a multiple of 16 (AVX2 scores under AVX-512 values); AVX2 and AVX-512."""
    g = torch.Generator().manual_seed(length)
    query = torch.randn(3, heads, width, generator=g, dtype=torch.float64)
    rows = torch.randn(3, length + 5, width, generator=g, dtype=torch.float64)[:, :length]
    extra = torch.randn(3, heads, length, generator=g, dtype=torch.float64)
    keep = torch.rand(3, length, generator=g) > 0.4
    keep[1, :min(length - 1, 300)] = False  # row 1: a whole chunk masked (when long enough), its last key kept
    keep[:, -1] = True
    scores = (query @ rows.transpose(-1, -2)) * 0.3 + extra
    expected = scores.masked_fill(~keep[:, None], float("-inf")).softmax(-1) @ rows[..., :rank]
    out = cpu_mla.latent_attention(query.float(), rows.float(), rank, 0.3, keep, extra.float(), wide)
    assert out.shape == (3, heads, rank)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[torch.float32], rtol=0)
    unmasked = (query @ rows.transpose(-1, -2) * 0.3).softmax(-1) @ rows[..., :rank]
    torch.testing.assert_close(cpu_mla.latent_attention(query.float(), rows.float(), rank, 0.3, wide=wide).double(),
                               unmasked, atol=TOLERANCE[torch.float32], rtol=0)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_latent_attention_with_a_grouped_rope_term_apart(path):
    """attnconv's own MLA layout later: latent scores over the shared rows + RoPE scores per KV head, added."""
    g = torch.Generator().manual_seed(2)
    b, n_kv, group, rank, rope, length = 2, 3, 2, 16, 8, 40
    latent = torch.randn(b, length + 1, rank, generator=g)[:, :length]
    k_rot = torch.randn(b, n_kv, length, rope, generator=g)
    q_lat = torch.randn(b, n_kv * group, rank, generator=g)
    q_rot = torch.randn(b, n_kv, group, rope, generator=g)
    keep = torch.rand(b, length, generator=g) > 0.2
    keep[:, -1] = True
    extra = grouped_rope_scores(q_rot, k_rot, 0.25, path)  # [b, H, L]
    out = latent_attention(q_lat, latent, rank, 0.25, keep, extra, path)
    scores = (q_lat.double() @ latent.double().transpose(-1, -2)
              + (q_rot.double() @ k_rot.double().transpose(-1, -2)).reshape(b, n_kv * group, length)) * 0.25
    expected = scores.masked_fill(~keep[:, None], float("-inf")).softmax(-1) @ latent.double()
    torch.testing.assert_close(out.double(), expected, atol=5e-6, rtol=0)
    sdpa = latent_attention(q_lat.bfloat16(), latent.bfloat16(), rank, 0.25, keep, extra)  # the SDPA path
    assert (sdpa.double() - expected).abs().max() <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_latent_and_grouped_rope_terms_add_up_to_the_scores(backend):
    """Split scores (latent term + RoPE keys per KV head) equal one pass over [latent; key] rows when every KV head
    holds the same RoPE key: the building blocks for layouts with per-head RoPE keys."""
    g = torch.Generator().manual_seed(1)
    b, n_kv, group, rank, rope, length = 3, 2, 3, 16, 8, 21
    rows = torch.randn(b, length + 2, rank + rope, generator=g)[:, :length]
    query = torch.randn(b, n_kv * group, rank + rope, generator=g)
    whole = latent_scores(query, rows, 0.5, backend)
    k_rot = rows[:, None, :, rank:].expand(b, n_kv, length, rope)
    split = latent_scores(query[..., :rank], rows[..., :rank], 0.5, backend) + grouped_rope_scores(
        query[..., rank:].reshape(b, n_kv, group, rope), k_rot, 0.5, backend)
    expected = (query.double() @ rows.double().transpose(-1, -2)) * 0.5
    torch.testing.assert_close(whole.double(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(split.double(), expected, atol=2e-5, rtol=0)


def test_expand_latent_gives_the_unabsorbed_keys_and_values():
    kv_b, rows, q_nope, q_rot, keep = make_inputs(2, 3, 16, 8, 8, 12, 6)
    keys, values = expand_latent(rows[..., :16], rows[..., 16:], kv_b, 3, 8, 12)
    assert keys.shape == (2, 3, 6, 16) and values.shape == (2, 3, 6, 12)
    out = F.scaled_dot_product_attention(torch.cat([q_nope, q_rot], -1)[:, :, None], keys, values,
                                         attn_mask=keep[:, None, None, :], scale=0.4)[:, :, 0]
    torch.testing.assert_close(out, unabsorbed(q_nope, q_rot, rows, kv_b, 3, 8, 12, 0.4, keep), atol=1e-12, rtol=0)

"""The absorbed MLA decode attention against the unabsorbed computation (K/V expanded from the latent, plain
softmax attention) in float64, for odd shapes, strided cache views, padding masks, both backends and dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnconv.kernels import cpu_decode
from attnconv.kernels.mla_attention import (
    expand_latent,
    grouped_rope_scores,
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
BACKENDS = ["native", "torch"] if cpu_decode.unavailable_reason() is None else ["torch"]


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_absorbed_decode_matches_unabsorbed(shape, dtype, backend, masked):
    batch, heads, rank, rope, nope, v_dim, length = shape
    kv_b, rows, q_nope, q_rot, keep = make_inputs(*shape, seed=length)
    keep = keep if masked else torch.ones_like(keep)
    scale = (nope + rope) ** -0.5 * 3
    expected = unabsorbed(q_nope, q_rot, rows, kv_b, heads, nope, v_dim, scale, keep)
    w_uk, w_uv = split_kv_b(kv_b.to(dtype), heads, nope, v_dim)
    out = mla_decode_attention(q_nope.to(dtype), q_rot.to(dtype), rows.to(dtype), w_uk, w_uv, scale,
                               keep if masked else None, backend)
    assert out.dtype == dtype and out.shape == (batch, heads, v_dim)
    err = (out.double() - expected).abs().max().item()
    assert err <= TOLERANCE[dtype], err
    assert expected.abs().max() > 0.3  # outputs of magnitude ~1: the tolerance is a real bound


@pytest.mark.skipif("native" not in BACKENDS, reason=cpu_decode.unavailable_reason() or "")
def test_native_scores_are_used_on_cpu_float32(monkeypatch):
    calls = []
    real = cpu_decode.decode_scores
    monkeypatch.setattr(cpu_decode, "decode_scores", lambda *a: calls.append(a[1].shape) or real(*a))
    kv_b, rows, q_nope, q_rot, _ = make_inputs(2, 6, 16, 8, 8, 8, 9)
    w_uk, w_uv = split_kv_b(kv_b.float(), 6, 8, 8)
    mla_decode_attention(q_nope.float(), q_rot.float(), rows.float(), w_uk, w_uv, 0.3)
    assert calls == [(2, 1, 9, 24)]  # one shared key head, all six query heads in one call


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

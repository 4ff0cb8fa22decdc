"""Calibration statistics and RoPE helpers of the MLA conversion, against direct computations.

References: statistics computed from the stored activations (which the collectors never keep), transformers'
own eager attention probabilities and its two rotary functions (rotate_half and DeepSeek's interleaved).
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
)

from attnconv.convert.attention_weights import from_hf_attention
from attnconv.convert.mla.calibration import AttentionPhaseCollector, MomentCollector, PairNormCollector
from attnconv.convert.mla.inmemory import calibrate
from attnconv.convert.mla.rope import apply_phases, interleave_permutation, principal_rotations
from attnconv.testing import build_tiny_model


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = build_tiny_model("qwen3", tmp_path_factory.mktemp("q3"), n_heads=4, n_kv_heads=2)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def _inputs(model, ids):
    """Every layer's attention input, kept here only to compute the references."""
    seen = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["hidden_states"].reshape(-1, kw["hidden_states"].shape[-1])),
        with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
    for h in hooks:
        h.remove()
    return seen, out.attentions


def test_moments_give_every_linear_second_moment(qwen3):
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    (x, _), _ = _inputs(qwen3, ids)
    c = MomentCollector(x.shape[1])
    for part in x.split(40):  # batches of any size
        c.update(part, torch.zeros(len(part), dtype=torch.long))
    m = c.result()
    w, b = torch.randn(5, x.shape[1]), torch.randn(5)
    y = (x @ w.T + b).double()
    assert m.count == 96
    assert torch.allclose(m.of_linear(w, b), y.T @ y / len(y), rtol=1e-6, atol=1e-8)


def test_pair_norms_after_qk_norms(qwen3):
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    xs, _ = _inputs(qwen3, ids)
    attn = qwen3.model.layers[1].self_attn
    c = PairNormCollector(from_hf_attention(attn, qwen3.config))
    c.update(xs[1], torch.zeros(len(xs[1]), dtype=torch.long))
    q_mean, k_mean = c.result()
    with torch.no_grad():
        k = attn.k_norm(attn.k_proj(xs[1]).view(len(xs[1]), 2, 16))  # [t, n_kv, d]
    expected = torch.sqrt(k[..., :8] ** 2 + k[..., 8:] ** 2).mean(0)
    assert torch.allclose(k_mean.float(), expected, atol=1e-5) and q_mean.shape == (4, 8)


def test_attention_phases_match_the_source_attention(qwen3):
    """E_q sum_k p(q,k) e^{i theta (q - k)} from transformers' own eager attention probabilities."""
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    xs, probs = _inputs(qwen3, ids)
    layer = 1
    inv_freq = qwen3.model.rotary_emb.inv_freq
    stats = calibrate(qwen3, ids.flatten(), lambda i: [AttentionPhaseCollector(
        from_hf_attention(qwen3.model.layers[i].self_attn, qwen3.config), inv_freq)], seq_len=20)
    got = stats[layer][0].result()  # [heads, pairs]
    p = probs[layer].double()  # [b, heads, q, k]
    dist = (torch.arange(20)[:, None] - torch.arange(20)[None, :]).double()  # [q, k]
    phase = torch.exp(1j * dist[..., None] * inv_freq.double())  # [q, k, pairs]
    expected = torch.einsum("bhqk,qkp->hp", p.to(torch.complex128), phase) / (2 * 20)
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got.abs() <= 1 + 1e-9).all()
    assert got[:, 0].abs().max() < 0.9 < got[:, -1].abs().min()  # fast pairs average out, slow ones barely turn


def test_apply_phases_is_a_complex_product_on_query_pairs():
    q = torch.randn(3, 8, 5)  # [heads, head_dim, hidden]: 4 pairs (i, i + 4)
    phases = torch.randn(3, 4, dtype=torch.complex128)
    pairs = torch.tensor([[0, 2], [1, 3], [0, 1]])
    out = apply_phases(q, phases, pairs, rotary_dim=8)
    for h in range(3):
        for i in range(4):
            z = torch.complex(q[h, i].double(), q[h, i + 4].double())
            if i in pairs[h].tolist():
                z = z * phases[h, i]
            assert torch.allclose(out[h, i].double(), z.real, atol=1e-6)
            assert torch.allclose(out[h, i + 4].double(), z.imag, atol=1e-6)


def test_interleave_matches_deepseek_rotary():
    """Rotating x in rotate_half layout equals DeepSeek's interleaved rotation of x[perm]."""
    x = torch.randn(1, 2, 5, 8)  # [b, heads, t, d_r]
    angles = torch.arange(5.0)[:, None] * torch.tensor([1.0, 0.3, 0.1, 0.01])  # [t, pairs]
    cos, sin = torch.cat([angles, angles], -1).cos()[None], torch.cat([angles, angles], -1).sin()[None]
    half, _ = apply_rotary_pos_emb(x, x, cos, sin)
    perm = interleave_permutation(8)
    inter, _ = apply_rotary_pos_emb_interleave(x[..., perm], x[..., perm], cos, sin)
    assert torch.allclose(half, inter, atol=1e-6)


def test_principal_rotations_concentrate_key_energy(qwen3):
    w = from_hf_attention(qwen3.model.layers[0].self_attn, qwen3.config)
    cov = w.k.double() @ w.k.double().T  # weight-only second moment
    pairs = torch.tensor([0, 3, 7])
    u = principal_rotations(cov, w.shape, pairs)  # [3, n_kv, n_kv]
    for i, p in enumerate(pairs.tolist()):
        c = cov.reshape(2, 16, 2, 16)
        pair_cov = c[:, p, :, p] + c[:, p + 8, :, p + 8]
        assert torch.allclose(u[i].T @ u[i], torch.eye(2, dtype=torch.float64), atol=1e-9)
        energy = torch.diagonal(u[i].T @ pair_cov @ u[i])
        assert energy[0] >= pair_cov.diagonal().max() - 1e-9 and energy[0] >= energy[1]
        assert math.isclose(float(energy.sum()), float(pair_cov.trace()), rel_tol=1e-9)

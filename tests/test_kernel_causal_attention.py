"""Blocked causal attention (attnconv/kernels/causal_attention.py) against one SDPA call and a float64 eager form,
forward and backward, over MHA/GQA/MQA and odd lengths; and its use in training models on CPU."""

from __future__ import annotations

import pytest
import torch

import attnconv.kernels.causal_attention as causal_attention_module
from attnconv.kernels.causal_attention import (
    BLOCKED_LENGTHS,
    block_rows_for,
    causal_attention,
    causal_attention_reference,
)

# dtype -> (atol, rtol) for outputs and gradients against the float64 eager form
TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)}


def _eager(q, k, v, scale=None):
    """softmax(q k^T * scale + causal mask) v in float64, K/V repeated to the query heads."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = q.shape[2]
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf"))
    return scores.softmax(-1) @ v


def _inputs(b, h, h_kv, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=g).to(dtype).requires_grad_() for n in (h, h_kv, h_kv)]


@pytest.mark.parametrize("path", ["flash-ops", "sdpa"])  # torch's CPU flash ops directly, or the public call
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,h_kv", [(4, 4), (4, 2), (6, 1)])  # MHA, GQA, MQA
@pytest.mark.parametrize("s,rows", [(5, 2), (37, 8), (64, 16), (130, 128), (200, 64), (33, 33)])
def test_forward_and_backward_match_float64(dtype, h, h_kv, s, rows, path, monkeypatch):
    if path == "sdpa":
        monkeypatch.setattr(causal_attention_module, "_cpu_flash_ops", lambda: None)
    q, k, v = _inputs(2, h, h_kv, s, 16, dtype, seed=s + h_kv)
    grad = torch.randn(2, h, s, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = causal_attention(q, k, v, block_rows=rows)
    got = torch.autograd.grad(out, (q, k, v), grad)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out = _eager(qd, kd, vd)
    want = torch.autograd.grad(want_out, (qd, kd, vd), grad.double())
    atol, rtol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == (2, h, s, 16)
    torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=rtol)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol)


@pytest.mark.parametrize("path", ["flash-ops", "sdpa"])
@pytest.mark.parametrize("d_qk, d_v, scale", [(24, 16, None), (8, 12, 0.3)])  # MLA: value heads of another size
def test_value_head_size_other_than_the_query_s(d_qk, d_v, scale, path, monkeypatch):
    if path == "sdpa":
        monkeypatch.setattr(causal_attention_module, "_cpu_flash_ops", lambda: None)
    g = torch.Generator().manual_seed(d_qk)
    q, k = (torch.randn(2, 4, 70, d_qk, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(2, 4, 70, d_v, generator=g).requires_grad_()
    grad = torch.randn(2, 4, 70, d_v, generator=g)
    out = causal_attention(q, k, v, scale=scale, block_rows=32)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out = _eager(qd, kd, vd, scale)
    assert out.shape == (2, 4, 70, d_v)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=1e-4)
    want = torch.autograd.grad(want_out, (qd, kd, vd), grad.double())
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), want, strict=True):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4)


def test_blocks_equal_one_call_at_a_blocked_length_with_a_scale():
    s = BLOCKED_LENGTHS.start + 17  # blocks of 128 with a ragged last one
    assert block_rows_for(s, torch.device("cpu")) == 128
    q, k, v = _inputs(1, 4, 2, s, 8, torch.float32)
    out = causal_attention(q, k, v, scale=0.3)
    ref = causal_attention_reference(q, k, v, scale=0.3)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_block_choice_and_refusals():
    cpu = torch.device("cpu")
    assert block_rows_for(512, cpu) == 128
    assert block_rows_for(256, cpu) is None and block_rows_for(1024, cpu) is None  # one call does as well there
    assert block_rows_for(512, torch.device("cuda")) is None
    q, k, v = _inputs(1, 2, 2, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="as many keys as queries"):
        causal_attention(q, k[:, :, :5], v[:, :, :5])


def _tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def _loss_and_grads(model, x, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, labels=x, use_cache=False, **kw)
    out.loss.backward()
    return out.logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_training_models_use_blocks_and_give_sdpa_results(monkeypatch):
    from attnconv.patches import training_attention as cpu_attention

    model = _tiny_llama()
    x = torch.randint(0, 97, (2, BLOCKED_LENGTHS.start + 16), generator=torch.Generator().manual_seed(0))
    want_logits, want_grads = _loss_and_grads(model, x)
    calls = []
    monkeypatch.setattr(cpu_attention, "causal_attention",
                        lambda *a, **k: calls.append(1) or causal_attention(*a, **k))
    with cpu_attention.cpu_training_attention(model, torch.device("cpu")) as switched:
        assert switched and model.config._attn_implementation == cpu_attention.NAME
        logits, grads = _loss_and_grads(model, x)
        assert len(calls) == 2  # one per layer
        # padding needs a mask: transformers' SDPA path, unchanged
        mask = torch.ones_like(x)
        mask[0, :7] = 0
        masked, _ = _loss_and_grads(model, x, attention_mask=mask)
        assert len(calls) == 2
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(logits, want_logits, atol=2e-5, rtol=1e-4)
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-3)
    torch.testing.assert_close(masked, _loss_and_grads(model, x, attention_mask=mask)[0], atol=1e-6, rtol=1e-6)


def test_other_devices_and_implementations_are_left_alone():
    from attnconv.patches.training_attention import cpu_training_attention

    model = _tiny_llama()
    with cpu_training_attention(model, torch.device("cuda")) as switched:
        assert not switched and model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with cpu_training_attention(model, torch.device("cpu")) as switched:
        assert not switched and model.config._attn_implementation == "eager"


def test_under_cpu_autocast_and_gradient_checkpointing():
    # Rotary embeddings leave q/k in float32 and v in bf16 under autocast: the blocks cast them as SDPA would.
    from attnconv.patches.training_attention import cpu_training_attention

    model = _tiny_llama()
    x = torch.randint(0, 97, (2, BLOCKED_LENGTHS.start + 16), generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x, use_cache=False).loss
        loss.backward()
        return loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    want_loss, want_grad = run()
    with cpu_training_attention(model, torch.device("cpu")):
        loss, grad = run()
        from attnconv.uptrain.model_setup import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
        model.train()
        loss_ckpt, grad_ckpt = run()
    torch.testing.assert_close(loss, want_loss, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(grad, want_grad, atol=2e-3 * want_grad.abs().max().item(), rtol=0.05)
    torch.testing.assert_close(loss_ckpt, loss, atol=0, rtol=0)  # recomputation repeats the same computation
    torch.testing.assert_close(grad_ckpt, grad, atol=0, rtol=0)

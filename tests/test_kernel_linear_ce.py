"""The fused linear cross-entropy against the eager two-op form, forward and backward."""

from __future__ import annotations

import pytest
import torch

from attnconv.kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_reference,
    resolve_backend,
)

# dtype -> (atol, rtol) for the loss and the gradients; bf16 matmuls round every product.
TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(n, d, v, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, b, t


def _grads(fn, h, w, b, t, scale=1.0, **kw):
    for x in (h, w, b):
        if x is not None:
            x.grad = None
    loss = fn(h, w, t, b, **kw)
    (loss * scale).backward()
    return loss.detach(), [x.grad.clone() for x in (h, w, b) if x is not None and x.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,d,v,chunk,bias", [(37, 16, 101, 8, False), (64, 32, 50, 64, True), (5, 8, 7, 2, True),
                                                (50, 24, 333, 7, False)])
def test_matches_eager_forward_and_backward(dtype, n, d, v, chunk, bias):
    h, w, b, t = _inputs(n, d, v, dtype, bias)
    t[::5] = -100  # ignored targets count neither in the loss nor in the mean
    ref_loss, ref_grads = _grads(linear_cross_entropy_reference, h, w, b, t)
    loss, grads = _grads(linear_cross_entropy, h, w, b, t, backend="torch", chunk_rows=chunk)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(loss.float(), ref_loss.float(), atol=atol, rtol=rtol)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


def test_grad_output_scale_frozen_weight_and_3d_input():
    h, w, b, t = _inputs(24, 16, 40, torch.float32, False)
    w.requires_grad_(False)
    ref_loss, (ref_gh,) = _grads(linear_cross_entropy_reference, h, w, None, t, scale=3.0)
    h3 = h.detach().view(4, 6, 16).requires_grad_()
    loss = linear_cross_entropy(h3, w, t.view(4, 6), backend="torch", chunk_rows=5)
    (loss * 3.0).backward()
    torch.testing.assert_close(loss.detach(), ref_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h3.grad.view(24, 16), ref_gh, atol=1e-6, rtol=1e-5)
    assert w.grad is None


def test_closed_form_uniform_logits():
    # Zero weights: every logit is 0, so the loss is log(V) whatever the targets.
    h = torch.randn(9, 4)
    w = torch.zeros(13, 4, requires_grad=True)
    loss = linear_cross_entropy(h, w, torch.arange(9), backend="torch", chunk_rows=4)
    assert abs(loss.item() - torch.log(torch.tensor(13.0)).item()) < 1e-6


def test_under_cpu_autocast_matches_bf16_reference():
    h, w, b, t = _inputs(33, 16, 90, torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _grads(linear_cross_entropy, h, w, b, t, backend="torch", chunk_rows=10)
        ref_loss, ref_grads = _grads(linear_cross_entropy_reference, h, w, b, t)
    torch.testing.assert_close(loss, ref_loss.float(), atol=2e-2, rtol=2e-2)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want.float(), atol=2e-2, rtol=2e-2)


def test_backend_selection():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="liger backend needs a CUDA device"):
        resolve_backend("liger", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown"):
        resolve_backend("triton", torch.device("cpu"))


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("backend", ["torch", "liger"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_match_eager(backend, dtype):
    if backend == "liger":
        pytest.importorskip("liger_kernel")
    h, w, b, t = _inputs(300, 64, 1000, dtype, False)
    h, w, t = (h.detach().cuda().requires_grad_(), w.detach().cuda().requires_grad_(), t.cuda())
    t[::7] = -100
    ref_loss, ref_grads = _grads(linear_cross_entropy_reference, h, w, None, t)
    loss, grads = _grads(linear_cross_entropy, h, w, None, t, backend=backend)
    atol, rtol = (2e-4, 2e-3) if dtype == torch.float32 else TOLERANCE[dtype]  # TF32/fused accumulation order
    torch.testing.assert_close(loss.float(), ref_loss.float(), atol=atol, rtol=rtol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2", "gpt_bigcode"])
def test_fused_loss_head_in_every_family(family, tmp_path):
    """The swapped output layer returns transformers' own LM loss, its gradients, and the logits when idle."""
    from transformers import AutoModelForCausalLM, GPTBigCodeConfig

    from attnconv.patches.fused_loss import install_fused_loss, loss_targets, remove_fused_loss
    from attnconv.testing import build_tiny_model

    if family == "gpt_bigcode":  # what GPT-2 conversions are written as
        cfg = GPTBigCodeConfig(vocab_size=300, n_embd=32, n_layer=2, n_head=4, multi_query=True, n_positions=64)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(build_tiny_model(family, tmp_path / family), dtype=torch.float32)
    model.eval()  # no dropout: the two forwards below must see the same function (gradients still flow)
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    want = model(input_ids=inputs, labels=ids[:, :-1]).loss  # HF shifts: scores positions 0..14
    logits = model(input_ids=inputs).logits
    want_all = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    want_all.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    names = [n for n, _ in model.named_parameters()]
    head = install_fused_loss(model, "torch", torch.device("cpu"))
    assert head is not None and [n for n, _ in model.named_parameters()] == names
    with loss_targets(head, targets):
        got = model(input_ids=inputs).logits
    got.backward()
    torch.testing.assert_close(got, want_all, atol=1e-5, rtol=1e-5)
    assert abs(want.item() - want_all.item()) < 0.5  # same model, one position fewer: a sanity check on the data
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-4, msg=n)
    torch.testing.assert_close(model(input_ids=inputs).logits, logits)  # without targets: the plain logits
    remove_fused_loss(model, head)
    assert type(model.get_output_embeddings()) is torch.nn.Linear

"""The optimizer step with clipping folded into fused AdamW against clip_grad_norm_ + step."""

from __future__ import annotations

import pytest
import torch

from attnconv.uptrain.optim import clip_and_step


def _params_and_grads(seed, grad_size):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(300, generator=g)), torch.nn.Parameter(torch.randn(17, 9, generator=g))]
    grads = [[torch.randn(p.shape, generator=g) * grad_size for p in params] for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("grad_size,fused", [(5.0, True), (0.01, True), (5.0, False)])  # clipped, not clipped
def test_matches_clip_grad_norm_then_step(grad_size, fused):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    params, grads = _params_and_grads(0, grad_size)
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = accelerator.prepare(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused or None))
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)  # the plain for-each implementation
    seen = []
    opt.optimizer.register_step_pre_hook(lambda o, *_: seen.append(getattr(o, "grad_scale", None)))
    for step_grads in grads:
        for p, q, g in zip(params, ref, step_grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        norm = clip_and_step(accelerator, opt, params, 1.0)
        want = torch.nn.utils.clip_grad_norm_(ref, 1.0)
        ref_opt.step()
        torch.testing.assert_close(norm, want, atol=0, rtol=1e-6)
        for p, q in zip(params, ref, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-6)
    assert all((s is not None) == fused for s in seen)  # the fold is used exactly for the fused optimizer
    assert getattr(opt.optimizer, "grad_scale", None) is None  # nothing left behind for a GradScaler

"""The column softmax kernel (attnconv/kernels/cpu_softmax.c) against float64, and the loss kernel on both paths."""

from __future__ import annotations

import math

import pytest
import torch

from attnconv.kernels import cpu_softmax
from attnconv.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

needs_native = pytest.mark.skipif(not cpu_softmax.native_available(), reason="native column softmax unavailable")


def _float64_columns(x: torch.Tensor):
    """Max, exp(x - max) and column sums in float64, from the float32 differences the kernel exponentiates."""
    peak = x.amax(dim=0, keepdim=True)
    exps = (x - peak).double().exp()
    return peak.double(), exps, exps.sum(dim=0, keepdim=True)


@needs_native
@pytest.mark.parametrize("rows,cols", [(1, 1), (5, 7), (50, 8), (333, 13), (1000, 64), (4099, 40), (2, 321)])
@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_matches_float64(rows, cols, spread):
    g = torch.Generator().manual_seed(rows * 7 + cols)
    x = torch.randn(rows, cols, generator=g) * spread
    want_peak, want_exps, want_total = _float64_columns(x)
    got = x.clone()
    peak, total = cpu_softmax.exp_columns_(got, native=True)
    assert peak.shape == total.shape == (1, cols)
    torch.testing.assert_close(peak.double(), want_peak, atol=0, rtol=0)  # a max is exact
    # exp within 2 float32 ulps (1.2e-7 relative each) of the float64 value; subnormal results become 0
    torch.testing.assert_close(got.double(), want_exps, atol=1e-37, rtol=2.5e-7)
    torch.testing.assert_close(total.double(), want_total, atol=0, rtol=3e-7)


@needs_native
def test_strided_rows_extremes_and_nan():
    wide = torch.zeros(6, 20)
    x = wide[:, 2:14]  # [6, 12] with a row stride of 20
    x.copy_(torch.tensor([[0.0, -1e4, 88.0, -88.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]] * 6))
    x[3, 5] = float("nan")
    before = wide.clone()
    peak, total = cpu_softmax.exp_columns_(x, native=True)
    assert torch.equal(wide[:, :2], before[:, :2]) and torch.equal(wide[:, 14:], before[:, 14:])  # outside untouched
    assert torch.equal(x[:, 1], torch.ones(6)) and x[0, 2] == 1.0  # each column equal: exp(0) = 1
    assert torch.isnan(total[0, 5]) and torch.isnan(x[3, 5])  # NaN is kept, not hidden
    torch.testing.assert_close(total[0, [0, 1, 2, 3, 4, 6]], torch.full((6,), 6.0))


def test_torch_path_and_refusals():
    x = torch.randn(30, 9)
    peak, total = cpu_softmax.exp_columns_(x.clone(), native=False)
    want_peak, _, want_total = _float64_columns(x)
    torch.testing.assert_close(total.double(), want_total, atol=0, rtol=1e-6)
    with pytest.raises(RuntimeError, match="float32 CPU matrix"):
        cpu_softmax.exp_columns_(x.double(), native=True)
    with pytest.raises(RuntimeError, match="float32 CPU matrix"):
        cpu_softmax.exp_columns_(x.t(), native=True)  # columns, not rows, contiguous


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=needs_native)])
def test_loss_kernel_on_each_path_matches_eager(native, monkeypatch):
    monkeypatch.setattr(cpu_softmax, "native_available", lambda: native)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(70, 24, generator=g, requires_grad=True)
    w = (torch.randn(517, 24, generator=g) * 0.5).requires_grad_()
    t = torch.randint(0, 517, (70,), generator=g)
    t[::6] = -100
    want = linear_cross_entropy_reference(h, w, t)
    want_h, want_w = torch.autograd.grad(want, (h, w))
    got = linear_cross_entropy(h, w, t, backend="torch", chunk_rows=16)
    got_h, got_w = torch.autograd.grad(got, (h, w))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_h, want_h, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got_w, want_w, atol=1e-6, rtol=1e-4)
    assert math.isfinite(got.item())

"""The CPU decode kernels (attnconv/kernels/cpu_decode.c) against float64 references: the few-row Linear and the
grouped-query attention scores; their build and fallbacks, and the decode loop's Linear patching."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnconv.errors import AttnconvError
from attnconv.kernels import cpu_decode

# fp32 products summed over K in a different order than BLAS: the error grows like sqrt(K) * eps * |x||w|.
ATOL, RTOL = 1e-4, 1e-5

needs_native = pytest.mark.skipif(cpu_decode.unavailable_reason() is not None,
                                  reason=f"native CPU kernel unavailable: {cpu_decode.unavailable_reason()}")


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n,k", [(64, 768), (11, 37), (257, 128), (3, 8), (1000, 13)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_rows_matches_float64_linear(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = cpu_decode.linear_rows(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    torch.testing.assert_close(got.double(), want, atol=ATOL * k ** 0.5, rtol=RTOL)


@needs_native
def test_linear_rows_takes_leading_dims_and_strided_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 40, generator=g)[..., ::2]  # [2, 3, 20], not contiguous: 6 rows
    w = torch.randn(20, 17, generator=g).T  # [17, 20] transposed view
    got = cpu_decode.linear_rows(x, w)
    assert got.shape == (2, 3, 17)
    torch.testing.assert_close(got, F.linear(x, w), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="1-8 rows"):
        cpu_decode.linear_rows(torch.randn(9, 20), torch.randn(4, 20))
    with pytest.raises(ValueError, match="float32"):
        cpu_decode.linear_rows(torch.randn(2, 20, dtype=torch.float64), torch.randn(4, 20, dtype=torch.float64))


@needs_native
def test_library_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCONV_CACHE", str(tmp_path))
    first = cpu_decode._build()
    assert first.parent == tmp_path / "kernels" and first.name.startswith("cpu_decode-")
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.name]  # no temporary left behind
    stamp = first.stat().st_mtime_ns
    assert cpu_decode._build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_backends_fall_back_or_raise_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNCONV_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setenv("CC", "no-such-compiler-attnconv")
    cpu_decode._library.cache_clear()
    try:
        assert "no-such-compiler-attnconv" in cpu_decode.unavailable_reason() or not cpu_decode._cpu_supports_avx2()
        assert cpu_decode.resolve_backend("auto") == "torch"  # quietly the oneDNN path
        assert cpu_decode.resolve_backend("torch") == "torch"
        with pytest.raises(AttnconvError, match="not available.*--decode-kernel torch"):
            cpu_decode.resolve_backend("native")
        with pytest.raises(AttnconvError, match="unknown CPU decode backend"):
            cpu_decode.resolve_backend("fast")
    finally:
        cpu_decode._library.cache_clear()


@needs_native
def test_decode_linears_route_few_rows_to_the_kernel(monkeypatch):
    from attnconv.patches.decode_linear import packed_linears

    calls = []
    real = cpu_decode.linear_rows
    monkeypatch.setattr(cpu_decode, "linear_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(37, 53), torch.nn.Linear(53, 11, bias=False))
    for shape, native in [((8, 37), True), ((2, 1, 37), True), ((9, 37), False), ((3, 5, 37), False)]:
        x = torch.randn(shape)
        want = net(x)
        calls.clear()
        with torch.inference_mode(), packed_linears(net, kernel="auto") as n:
            got = net(x)
        assert n == 2 and bool(calls) == native, shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        calls.clear()
        with torch.inference_mode(), packed_linears(net, kernel="torch"):
            torch.testing.assert_close(net(x), want, atol=1e-5, rtol=1e-5)
        assert not calls  # "torch" never uses the kernel


@needs_native
@pytest.mark.parametrize("g", [1, 2, 4, 7, 12, 13])
@pytest.mark.parametrize("d,length", [(64, 2049), (8, 1), (16, 5), (80, 37), (24, 300)])
def test_decode_scores_match_float64(g, d, length):
    gen = torch.Generator().manual_seed(g * 100 + d + length)
    b, h, max_len = 3, 2, length + 11
    q = torch.randn(b, h, g, d, generator=gen)
    buffer = torch.randn(b, h, max_len, d, generator=gen)  # a preallocated cache: keys as rows
    keys = buffer[:, :, :length]  # the filled part, a strided view
    got = cpu_decode.decode_scores(q, keys, d ** -0.5)
    want = (q.double() @ keys.double().transpose(-1, -2)) * d ** -0.5
    assert got.shape == (b, h, g, length)
    torch.testing.assert_close(got.double(), want, atol=ATOL * d ** 0.5, rtol=RTOL)


def test_decode_scores_refuses_columns_and_odd_head_sizes():
    if cpu_decode.unavailable_reason() is not None:
        pytest.skip(cpu_decode.unavailable_reason())
    with pytest.raises(ValueError, match="contiguous rows"):
        cpu_decode.decode_scores(torch.randn(1, 1, 2, 16), torch.randn(1, 1, 16, 9).transpose(-1, -2), 1.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        cpu_decode.decode_scores(torch.randn(1, 1, 2, 12), torch.randn(1, 1, 9, 12), 1.0)

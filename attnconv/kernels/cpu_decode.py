"""CPU decode kernels (float32, AVX2 + FMA): a Linear layer for at most 8 rows (the batch of a decode step), and
the attention scores of grouped query heads against a cache that keeps keys as rows.

A decode step multiplies the batch's few rows by every weight matrix, so it should run at memory bandwidth; BLAS
sgemm and oneDNN read such few-row products' weights well below the bandwidth a plain sum reaches. `cpu_decode.c`
streams each weight row once and keeps the 8 rows' partial sums in registers. Larger batches go to oneDNN, which
is built for them. `decode_scores` dots the G query heads that share a key head with eight keys at a time, the key
rows staying in L1 for all G heads, where BLAS runs G-row products slowly. Figures: docs/benchmarks.md
(benchmarks/decode.py measures the whole loop).

Built on first use by attnconv.kernels.native (system C compiler, cached; OpenMP shares torch's threads).
Backends as for the other kernels: "auto" uses the kernels where they build and load and falls back to torch
quietly; "native" asks for them and raises when they cannot be had; "torch" never uses them.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from attnconv.errors import AttnconvError
from attnconv.kernels import native

SOURCE = Path(__file__).with_name("cpu_decode.c")
MAX_ROWS = 8  # attnconv_linear_rows keeps 8 rows' partial sums in registers
BACKENDS = ("auto", "native", "torch")
_i64, _ptr = native.I64, native.PTR
_cpu_supports_avx2 = native.cpu_supports_avx2


def _build() -> Path:
    return native.build(SOURCE)


@cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernels, or why they are not available (a string)."""
    return native.load(SOURCE, {"attnconv_linear_rows": ([_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64], None),
                                "attnconv_decode_scores": ([_ptr, _ptr, _ptr] + [_i64] * 8 + [native.F32], None)})


def unavailable_reason() -> str | None:
    lib = _library()
    return lib if isinstance(lib, str) else None


def resolve_backend(backend: str) -> str:
    """'native' or 'torch' for BACKEND; 'native' asked for explicitly raises when the kernels cannot be had."""
    if backend not in BACKENDS:
        raise AttnconvError(f"unknown CPU decode backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    reason = unavailable_reason()
    if reason is None:
        return "native"
    if backend == "native":
        raise AttnconvError(f"the native CPU decode kernel is not available: {reason}; "
                            "use --decode-kernel torch")
    return "torch"


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"cpu_decode kernels take float32 CPU tensors, got {t.dtype} on {t.device}")


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for at most 8 rows: x [..., K] (rows = prod of leading dims), weight [N, K], bias [N]."""
    _check(x, weight)
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()  # [M, K]
    m, n = x2.shape[0], weight.shape[0]
    if not 1 <= m <= MAX_ROWS or weight.shape[1] != k:
        raise ValueError(f"linear_rows takes 1-{MAX_ROWS} rows of {weight.shape[1]}, got {tuple(x.shape)}")
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    _library().attnconv_linear_rows(x2.data_ptr(), m, k, w.data_ptr(), None if b is None else b.data_ptr(),
                                    y.data_ptr(), n)
    return y.reshape(*lead, n)


def decode_scores(query: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * query [b, n_kv, g, d] @ keys [b, n_kv, L, d]^T -> scores [b, n_kv, g, L], float32.

    keys: rows of d contiguous floats (stride 1 on the last axis; any other strides, e.g. a view of the filled
    part of a preallocated cache); d a multiple of 8."""
    _check(query, keys)
    q = query.contiguous()
    b, h, g, d = q.shape
    length = keys.shape[2]
    if keys.shape[:2] != (b, h) or keys.shape[3] != d or keys.stride(-1) != 1 or d % 8:
        raise ValueError(f"decode_scores takes keys [b, n_kv, L, {d}] with contiguous rows and a head size that is a "
                         f"multiple of 8, got {tuple(keys.shape)} with strides {keys.stride()}")
    s = torch.empty(b, h, g, length, dtype=torch.float32)
    _library().attnconv_decode_scores(q.data_ptr(), keys.data_ptr(), s.data_ptr(), b, h, g, d, length,
                                      keys.stride(0), keys.stride(1), keys.stride(2), float(scale))
    return s

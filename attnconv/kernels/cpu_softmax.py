"""Column softmax of a float32 [V, c] block in place, for the chunked linear cross-entropy: per column the max,
the exponentials exp(x - max) written over x, and their sum.

Two passes of `cpu_softmax.c` over the block where torch makes four (amax, sub_, exp_, sum): the block is
vocabulary-sized, so each pass is a trip through memory (docs/benchmarks.md has the figures). Falls back to those
torch ops where the kernel cannot be built or loaded (no AVX2, no compiler) and for other dtypes and devices.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from attnconv.kernels import native

SOURCE = Path(__file__).with_name("cpu_softmax.c")
_i64, _ptr = native.I64, native.PTR


@cache
def _library() -> ctypes.CDLL | str:
    return native.load(SOURCE, {"attnconv_column_max": ([_ptr, _i64, _i64, _i64, _ptr], None),
                                "attnconv_exp_column_sums": ([_ptr, _i64, _i64, _i64, _ptr, _ptr], None)})


def native_available() -> bool:
    return not isinstance(_library(), str)


def exp_columns_(x: torch.Tensor, native: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [V, c] float32 -> (peak [1, c], total [1, c]); x becomes exp(x - peak), total its column sums.

    native: None uses the C kernel where it applies, False the torch ops, True requires the kernel."""
    usable = x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and x.stride(1) == 1
    if native is None:
        native = usable and native_available()
    if not native:
        peak = x.amax(dim=0, keepdim=True)  # [1, c]
        total = x.sub_(peak).exp_().sum(dim=0, keepdim=True)  # [1, c]
        return peak, total
    if not usable or not native_available():
        raise RuntimeError(f"the native column softmax needs a float32 CPU matrix with contiguous rows and the C "
                           f"kernel ({_library() if not native_available() else 'available'})")
    rows, cols = x.shape
    peak = torch.empty(1, cols, dtype=torch.float32)
    total = torch.empty(1, cols, dtype=torch.float32)
    lib = _library()
    lib.attnconv_column_max(x.data_ptr(), rows, cols, x.stride(0), peak.data_ptr())
    lib.attnconv_exp_column_sums(x.data_ptr(), rows, cols, x.stride(0), peak.data_ptr(), total.data_ptr())
    return peak, total

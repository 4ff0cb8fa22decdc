"""CPU kernel for a one-token MLA decode step over a latent cache (float32, AVX2 + FMA): `cpu_mla.c`.

softmax(scale * query . rows^T [+ extra], masked) @ rows[..., :R], all heads of a sequence against the rows they
share, in one pass over the cache: scores, softmax and the value product per chunk of 256 keys while the chunk is
in cache, merged across chunks at the end. Built on first use by attnconv.kernels.native; where it cannot be built
`available()` is False and kernels/mla_attention.py takes its torch path.
"""

from __future__ import annotations

import ctypes
from functools import cache
from pathlib import Path

import torch

from attnconv.kernels import native

SOURCE = Path(__file__).with_name("cpu_mla.c")
CHUNK = 256  # keys per work item, as in cpu_mla.c
_i64, _ptr = native.I64, native.PTR


@cache
def _library() -> ctypes.CDLL | str:
    return native.load(SOURCE, {
        "attnconv_mla_decode": ([_ptr, _ptr, _i64, _i64, _ptr, _i64, _ptr] + [_i64] * 5
                                + [native.F32, _ptr, _ptr, _ptr, native.INT], None),
        "attnconv_mla_has_avx512": ([], native.INT)})


def available() -> bool:
    return not isinstance(_library(), str)


def has_avx512() -> bool:
    """Whether the kernel runs its AVX-512 variants on this CPU (twice the multiply-adds per instruction)."""
    return available() and bool(_library().attnconv_mla_has_avx512())


def supports(query: torch.Tensor, rows: torch.Tensor, rank: int) -> bool:
    """Whether the kernel takes these: float32 CPU, rows with stride 1 on the last axis, sizes multiples of 8."""
    width = rows.shape[-1]
    return (query.dtype == rows.dtype == torch.float32 and query.device.type == rows.device.type == "cpu"
            and rows.stride(-1) == 1 and query.shape[-1] == width and width % 8 == 0 and rank % 8 == 0
            and 0 < rank <= width)


def latent_attention(query: torch.Tensor, rows: torch.Tensor, rank: int, scale: float,
                     keep: torch.Tensor | None = None, extra: torch.Tensor | None = None,
                     wide: bool = True) -> torch.Tensor:
    """query [b, H, D] . rows [b, L, D] (shared by the H heads) -> softmax -> @ rows[..., :rank]: [b, H, rank].

    keep: boolean [b, L] (False: masked out) or None; extra: scores [b, H, L] added before the softmax (e.g. a RoPE
    term computed apart), or None; wide: AVX-512 where the CPU has it (False: AVX2 only).
    Requires `supports(query, rows, rank)`."""
    if not supports(query, rows, rank):
        raise ValueError(f"cpu_mla takes float32 CPU rows [b, L, D] with stride 1 along D, D and the rank "
                         f"multiples of 8; got {tuple(rows.shape)} {rows.dtype} strides {rows.stride()}, "
                         f"rank {rank}")
    b, heads, width = query.shape
    length = rows.shape[1]
    q = query.contiguous()
    if keep is not None:
        keep = keep.to(torch.bool)
        if keep.stride(-1) != 1:
            keep = keep.contiguous()
    extra = None if extra is None else extra.float().contiguous()
    chunks = -(-length // CHUNK)
    scores = torch.empty(b, chunks, heads, CHUNK)
    parts = torch.empty(b, chunks, heads, rank + 2)
    out = torch.empty(b, heads, rank)
    _library().attnconv_mla_decode(
        q.data_ptr(), rows.data_ptr(), rows.stride(0), rows.stride(1),
        None if keep is None else keep.data_ptr(), 0 if keep is None else keep.stride(0),
        None if extra is None else extra.data_ptr(), b, heads, width, rank, length, float(scale),
        scores.data_ptr(), parts.data_ptr(), out.data_ptr(), int(wide))
    return out

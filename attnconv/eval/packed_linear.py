"""CPU decode: the model's Linear layers through oneDNN with weights packed once, instead of BLAS sgemm.

A decode step multiplies a few rows (the batch) by every weight matrix, so it should run at memory bandwidth.
On an AVX2 EPYC (this project's CI machine) torch's default fp32 path (MKL sgemm) reads an [8, 768] x [768, N]
product's weights at 4-10 GB/s; the same product through oneDNN with the weight reordered once for that batch
reads them at 10-19 GB/s (a sum reaches 25 GB/s), and decoding a 134 M Llama at batch 8 got 1.2-1.4x faster
(benchmarks/decode.py). This is the kernel torch.compile's CPU freezing pass picks; here it is used directly.

The packed copies are made on first use and kept (per module, until its weight changes); they cost one extra
copy of the Linear weights in memory. Anything unusual (no oneDNN build, another dtype or device) keeps the
module's own forward.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (weight version key, packed)
BATCH_HINT = 8  # oneDNN picks its blocking for this many rows; other batch sizes still compute exactly


def available(model) -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        ops._reorder_linear_weight, ops._linear_pointwise  # noqa: B018 - resolve lazily registered ops
    except (AttributeError, RuntimeError):
        return False
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32


def _packed_weight(module: torch.nn.Linear) -> torch.Tensor:
    w = module.weight
    key = (w.data_ptr(), w._version, tuple(w.shape))
    hit = _PACKED.get(module)
    if hit is None or hit[0] != key:
        hit = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), BATCH_HINT))
        _PACKED[module] = hit
    return hit[1]


def _forward(module: torch.nn.Linear, packed: torch.Tensor):
    def forward(x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out], as nn.Linear
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, module.bias, "none", [], "")

    return forward


@contextmanager
def packed_linears(model, enabled: bool = True):
    """Within this block every nn.Linear of MODEL (CPU, float32) runs through oneDNN with packed weights."""
    patched = []
    if enabled and available(model):
        for module in model.modules():
            if type(module) is torch.nn.Linear and "forward" not in module.__dict__:
                module.forward = _forward(module, _packed_weight(module))
                patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward

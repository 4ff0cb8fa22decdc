"""CPU decode: the model's Linear layers through kernels built for a few rows, instead of BLAS sgemm.

A decode step multiplies a few rows (the batch) by every weight matrix, so it should run at memory bandwidth;
torch's default fp32 path (MKL sgemm) reads such products' weights far below it. Two faster paths, in this order:
- up to 8 rows: attnconv's own AVX2 kernel (kernels/cpu_decode.py), which streams each weight row once, straight
  from the module's weight;
- more rows (prefill, large batches), or where that kernel cannot be built: oneDNN with the weight reordered once
  for that batch (the kernel torch.compile's CPU freezing pass picks). The packed copy is made on first use and
  kept per module until its weight changes; it costs one extra copy of that weight.
Anything unusual (no oneDNN build, another dtype or device) keeps the module's own forward.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch

from attnconv.kernels import cpu_decode

_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (weight version key, packed)
BATCH_HINT = 8  # oneDNN picks its blocking for this many rows; other batch sizes still compute exactly


def onednn_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    if ops is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        ops._reorder_linear_weight, ops._linear_pointwise  # noqa: B018 - resolve lazily registered ops
    except (AttributeError, RuntimeError):
        return False
    return True


def available(model) -> bool:
    """Whether MODEL's Linear layers can take a faster path at all (CPU, float32)."""
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


def _forward(module: torch.nn.Linear, native: bool, onednn: bool):
    own = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out], as nn.Linear
        rows = x.numel() // x.shape[-1]
        if native and rows <= cpu_decode.MAX_ROWS:
            return cpu_decode.linear_rows(x, module.weight, module.bias)
        if onednn:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), _packed_weight(module), module.bias, "none",
                                                      [], "")
        return own(x)

    return forward


@contextmanager
def packed_linears(model, enabled: bool = True, kernel: str = "auto"):
    """Within this block every nn.Linear of MODEL (CPU, float32) runs through the few-row kernel or oneDNN.

    kernel: "auto" (attnconv's kernel where it builds, else oneDNN), "native" (raise if it cannot be had),
    "torch" (oneDNN only). Yields the number of modules patched.
    """
    patched = []
    if enabled and available(model):
        native = cpu_decode.resolve_backend(kernel) == "native"
        onednn = onednn_available()
        if native or onednn:
            for module in model.modules():
                if type(module) is torch.nn.Linear and "forward" not in module.__dict__:
                    module.forward = _forward(module, native, onednn)
                    patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward

"""Liger-Kernel's fused RMSNorm/RoPE/SwiGLU for training on CUDA, where Liger knows the model's family."""

from __future__ import annotations

import importlib
import inspect

from attnconv.kernels.linear_cross_entropy import liger_available


def apply_liger(model) -> bool:
    """Patch the model's RMSNorm/RoPE/SwiGLU with Liger's fused kernels where Liger knows its model_type.

    The loss is computed by attnconv (patches/fused_loss.py), so Liger's own cross-entropy patches stay off.
    Returns whether anything was patched.
    """
    if not liger_available():
        return False
    model_type = getattr(model.config, "model_type", "")
    try:
        patches = importlib.import_module("liger_kernel.transformers")
    except Exception:  # a broken GPU stack must not stop training with the plain kernels
        return False
    fn = getattr(patches, f"apply_liger_kernel_to_{model_type}", None)
    if fn is None:
        return False
    wanted = dict(rope=True, rms_norm=True, swiglu=True, geglu=True, cross_entropy=False,
                  fused_linear_cross_entropy=False, model=model)
    accepted = inspect.signature(fn).parameters  # e.g. Gemma takes geglu, Llama swiglu
    fn(**{k: v for k, v in wanted.items() if k in accepted})
    return True

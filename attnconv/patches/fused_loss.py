"""Training without the [batch, seq, vocab] logits: the model's output layer computes the loss itself.

`FusedLossHead` takes the place of `lm_head` (same Parameter objects, same state-dict names, ties kept).
While `targets` are set it returns the mean cross-entropy from the final hidden states through
attnconv.kernels.linear_cross_entropy; otherwise it is the plain linear layer. Computing the loss inside
the model's own forward keeps DDP and FSDP hooks intact (the weight is used while the wrapper expects it).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from attnconv.kernels import LOSS_KERNELS
from attnconv.kernels.linear_cross_entropy import BACKENDS, linear_cross_entropy, resolve_backend

# Config keys of families that transform the logits after lm_head (the fused loss would skip that).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class FusedLossHead(torch.nn.Module):
    def __init__(self, head: torch.nn.Linear, backend: str):
        super().__init__()
        self.weight = head.weight  # the same Parameter: optimizer, ties and checkpoints see no change
        self.bias = head.bias
        self.backend = backend
        self.original = [head]  # a list: not registered as a submodule, so names stay lm_head.weight
        self.targets: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return F.linear(hidden, self.weight, self.bias)
        # hidden [b, s, d], targets [b, s] -> scalar mean loss (returned where the logits would be)
        return linear_cross_entropy(hidden, self.weight, self.targets, self.bias, backend=self.backend)


def fused_loss_supported(model) -> str | None:
    """None when the model's logits are exactly lm_head(hidden); else why the fused loss cannot be used."""
    config = getattr(model, "config", None)
    for key in _LOGIT_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0):
            return f"its config sets {key}"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return "its output layer is not a plain Linear"
    if not hasattr(model, "set_output_embeddings"):
        return "its output layer cannot be replaced"
    return None


def auto_kernel(device: torch.device, logits_bytes: int) -> str:
    """What 'auto' means, from benchmarks/uptrain.py: on CPU the chunked loss costs no speed and saves the
    logits' memory; on CUDA the plain logits path was faster (1.20x vs 1.02x Trainer at 1.6 GiB of logits, H100)
    until the logits get large, where Liger's fused kernel keeps memory flat (0.49x Trainer's peak)."""
    if device.type != "cuda":
        return "torch"
    return "liger" if logits_bytes > CUDA_PLAIN_LOGITS_BYTES else "reference"


CUDA_PLAIN_LOGITS_BYTES = 4 << 30


def install_fused_loss(model, kernel: str, device: torch.device, tokens: int = 0) -> FusedLossHead | None:
    """Swap lm_head for a FusedLossHead; None (nothing changed) for 'reference' or unsupported models.

    tokens: per micro-batch, for 'auto' (see auto_kernel), which also falls back to the pure-torch chunked
    form where Liger cannot load; 'liger' asked for explicitly raises when it cannot run.
    """
    if kernel not in LOSS_KERNELS:
        raise ValueError(f"unknown loss kernel {kernel!r}; choose one of {', '.join(LOSS_KERNELS)}")
    if kernel == "auto":
        vocab = getattr(model.config, "vocab_size", 0) or 0
        kernel = auto_kernel(device, 4 * tokens * vocab)
    if kernel == "reference" or fused_loss_supported(model) is not None:
        return None
    assert kernel in BACKENDS
    backend = resolve_backend(kernel, device)
    head = FusedLossHead(model.get_output_embeddings(), backend)
    model.set_output_embeddings(head)
    return head


def remove_fused_loss(model, head: FusedLossHead | None) -> None:
    """Put the original lm_head back (its weight is the trained Parameter)."""
    if head is not None:
        model.set_output_embeddings(head.original[0])


@contextmanager
def fused_loss(model, kernel: str, device: torch.device, tokens: int = 0) -> Iterator[FusedLossHead | None]:
    """Within this block MODEL's output layer is a FusedLossHead (None: nothing changed); the original is put back
    after it."""
    head = install_fused_loss(model, kernel, device, tokens)
    try:
        yield head
    finally:
        remove_fused_loss(model, head)


@contextmanager
def loss_targets(head: FusedLossHead, targets: torch.Tensor):
    """Within this block the model's forward returns the loss against `targets` [b, s]."""
    head.targets = targets
    try:
        yield
    finally:
        head.targets = None

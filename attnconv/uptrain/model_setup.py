"""Getting a loaded model ready to train: which parameters learn, and gradient checkpointing.

Attention: models are loaded with `attn_implementation="sdpa"`. Training feeds packed blocks without
padding and without an attention mask, so transformers' mask builder returns None and its SDPA
integration (`use_gqa_in_sdpa`: no mask and head_dim <= 256) calls
`scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)` with K/V at their n_kv heads:
K/V are never repeated to n_heads. tests/test_uptrain.py checks this on the installed versions.
"""

from __future__ import annotations

import torch

from attnconv.errors import AttnconvError

TRAIN_CHOICES = ("all", "only-attention")
# Module names that hold attention projections (q/k/v/o, fused qkv, latent MLA projections, their norms).
ATTENTION_MODULES = {"self_attn", "attn", "attention", "self_attention"}


def select_trainable(model: torch.nn.Module, train: str) -> tuple[int, int]:
    """Freeze parameters outside the chosen part; returns (trainable, total) parameter counts."""
    if train not in TRAIN_CHOICES:
        raise AttnconvError(f"--train must be one of {', '.join(TRAIN_CHOICES)}, not {train!r}")
    for name, p in model.named_parameters():
        p.requires_grad_(train == "all" or bool(ATTENTION_MODULES & set(name.split(".")[:-1])))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise AttnconvError(f"--train {train}: this model has no parameters under modules named "
                            f"{'/'.join(sorted(ATTENTION_MODULES))}; use --train all")
    return trainable, total


def enable_gradient_checkpointing(model) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise AttnconvError(f"{type(model).__name__} does not support gradient checkpointing; drop "
                            "--gradient-checkpointing")
    # Non-reentrant checkpointing works with frozen inputs (--train only-attention) and with DDP.
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

"""Training attention on CPU: transformers' SDPA path, with causal self-attention computed in query blocks.

Registered with transformers as "attnconv_train_cpu" (with SDPA's mask builder) and switched on for the training
run only; the saved model keeps "sdpa". Calls the blocked kernel (attnconv.kernels.causal_attention)
only where it is the same computation as SDPA's `is_causal=True`: no mask (packed blocks, no padding), no
dropout, no extra bias, as many keys as queries, a length where blocks are faster; everything else goes to
transformers' own `sdpa_attention_forward` unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from attnconv.kernels.causal_attention import block_rows_for, causal_attention
from attnconv.patches.attention import attention_implementation

NAME = "attnconv_train_cpu"
# Keyword arguments that make a layer's attention more than plain causal softmax attention.
_EXTRAS = ("position_bias", "softcap", "s_aux", "sinks", "cache", "output_attentions")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [b, h, s, d], key/value [b, h_kv, s_k, d] ->
    ([b, s, h, d], None)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    plain = (attention_mask is None and causal and dropout == 0.0 and key.shape[2] == query.shape[2]
             and not any(kwargs.get(name) for name in _EXTRAS))
    if plain and block_rows_for(query.shape[2], query.device):
        out = causal_attention(query, key, value, scale=scaling)  # [b, h, s, d]
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


@contextmanager
def cpu_training_attention(model, device: torch.device) -> Iterator[bool]:
    """Within this block a CPU model loaded with SDPA attention uses attention_forward; others are unchanged.
    Yields whether the model switched."""
    config = getattr(model, "config", None)
    if device.type != "cpu" or getattr(config, "_attn_implementation", None) != "sdpa":
        yield False
        return
    from transformers.masking_utils import sdpa_mask

    with attention_implementation(model, NAME, attention_forward, sdpa_mask) as switched:
        yield switched

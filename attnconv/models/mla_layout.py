"""Where the attnconv MLA format keeps each KV head's RoPE and NoPE dims: the one leaf that the model classes
(models/mla.py) and the conversion (convert/mla/attnconv_format.py) share."""

from __future__ import annotations

import torch
from torch import Tensor


def rope_dims(pairs: Tensor, rotary_dim: int) -> Tensor:
    """Head dims of the kept pairs in rotate_half order (first halves, then second halves): [n_kv, 2 n_keep]."""
    return torch.cat([pairs, pairs + rotary_dim // 2], dim=-1)


def nope_dims(rope: Tensor, head_dim: int) -> Tensor:
    """The other dims of each head, ascending: [n_kv, head_dim - rope_dim]."""
    keep = torch.ones(rope.shape[0], head_dim, dtype=torch.bool, device=rope.device)
    keep.scatter_(1, rope, False)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept dims first, each in ascending order
    return order[:, : head_dim - rope.shape[1]]

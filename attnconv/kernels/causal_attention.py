"""Causal self-attention for training on CPU: blocks of queries against their own key prefix, so the masked half
of the score matrix is not computed.

torch's CPU flash-attention kernel skips masked key blocks only in steps of 512 keys, and below 768 queries it
splits queries into blocks of 32-64 rows that each read all keys: at 512 tokens `is_causal=True` costs what full
attention costs (measured fwd + bwd, batch 4, 8 query / 2 key heads of 96: 86 ms causal, 85 full). Here query
block j (128 rows) attends only keys [0, end of block j), through the same kernel with a causal mask aligned to
its last row: 10/16 of the full work at 512 tokens, 60-65 ms for the shape above, 10-25% less on others measured
(head size 64-128, 1-16 key heads, batch 1-8). From 768 queries on the kernel's own blocking does as well or better,
so longer (and shorter) sequences take the single call. Exact: the same softmax over the same keys, to rounding.

No transformers imports: attnconv.uptrain.cpu_attention plugs this into models.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCK_ROWS = 128
# Query lengths where blocks pay off on CPU (see above); elsewhere one is_causal call.
BLOCKED_LENGTHS = range(384, 768)


def block_rows_for(q_len: int, device: torch.device) -> int | None:
    """Rows per query block for a causal self-attention of q_len tokens, or None for a single call."""
    return BLOCK_ROWS if device.type == "cpu" and q_len in BLOCKED_LENGTHS else None


def causal_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """One SDPA call: query [b, h, s, d], key/value [b, h_kv, s, d] -> [b, h, s, d]."""
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                          enable_gqa=query.shape[1] != key.shape[1])


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                     block_rows: int | None = None) -> torch.Tensor:
    """Causal attention of s queries over s keys: query [b, h, s, d], key/value [b, h_kv, s, d], h % h_kv == 0.

    block_rows: query rows per block; None picks by length and device (block_rows_for), 0 means one call.
    Returns [b, h, s, d_v].
    """
    s = query.shape[2]
    if key.shape[2] != s:
        raise ValueError(f"causal self-attention needs as many keys as queries, got {key.shape[2]} and {s}")
    rows = block_rows_for(s, query.device) if block_rows is None else block_rows
    if not rows or rows >= s:
        return causal_attention_reference(query, key, value, scale)
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for start in range(0, s, rows):
        end = min(start + rows, s)
        q, k, v = query[:, :, start:end], key[:, :, :end], value[:, :, :end]  # [b, h, r, d], [b, h_kv, end, d]
        if start == 0:  # a square block: the kernel's own causal mask
            outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa))
            continue
        # row i of this block is query start + i: it sees keys 0 .. start + i
        mask = torch.ones(end - start, end, dtype=torch.bool, device=query.device).tril(diagonal=start)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa))
    return torch.cat(outs, dim=2)

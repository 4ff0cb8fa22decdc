"""Causal self-attention for training on CPU: blocks of queries against their own key prefix, so the masked half
of the score matrix is not computed.

torch's CPU flash-attention kernel skips masked key blocks only in steps of 512 keys, and below 768 queries it
splits queries into blocks of 32-64 rows that each read all keys: at 512 tokens `is_causal=True` costs what full
attention costs. Here query block j (128 rows) attends only keys [0, end of block j), through the same kernel with
a causal mask aligned to its last row: 10/16 of the full work at 512 tokens. From 768 queries on the kernel's own
blocking does as well or better, so longer (and shorter) sequences take the single call. Exact: the same softmax
over the same keys, to rounding. On CPU the blocks call torch's flash ops directly and write into whole output and
gradient tensors (per-block public SDPA calls keep per-block temporaries alive, which costs peak memory);
elsewhere, or where those ops are missing, they go through the public call. Figures: docs/benchmarks.md.

No transformers imports: attnconv.patches.training_attention plugs this into models.
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


def _block_masks(s: int, rows: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor | None]:
    """Additive masks of the query blocks: row i of the block at `start` sees keys 0 .. start + i (None: the first,
    square block, uses the kernel's own causal flag)."""
    masks = []
    for start in range(0, s, rows):
        end = min(start + rows, s)
        hidden = ~torch.ones(end - start, end, dtype=torch.bool, device=device).tril(diagonal=start)
        masks.append(None if start == 0 else torch.zeros(end - start, end, dtype=dtype, device=device)
                     .masked_fill_(hidden, float("-inf")))
    return masks


def _cpu_flash_ops():
    try:
        return (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
                torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
    except (AttributeError, RuntimeError):  # a torch without them: the public path below
        return None


class BlockedCausalAttention(torch.autograd.Function):
    """The blocks through torch's CPU flash kernels directly: the output, its log-sum-exp and the gradients are
    written into whole tensors block by block (no per-block copies kept for backward, no zero-filled slice
    gradients), and the output's memory is [b, s, h, d], the layout transformers wants next."""

    @staticmethod
    def forward(ctx, query, key, value, scale, rows):
        forward, _ = _cpu_flash_ops()
        b, h, s, _ = query.shape
        out = query.new_empty(b, s, h, value.shape[-1]).transpose(1, 2)  # [b, h, s, d_v]
        lse = None  # [b, h, s], in the kernel's accumulation dtype
        for mask, start in zip(_block_masks(s, rows, query.dtype, query.device), range(0, s, rows), strict=True):
            end = min(start + rows, s)
            o, block_lse = forward(query[:, :, start:end], key[:, :, :end], value[:, :, :end], 0.0, mask is None,
                                   attn_mask=mask, scale=scale)
            lse = block_lse.new_empty(b, h, s) if lse is None else lse
            out[:, :, start:end] = o
            lse[:, :, start:end] = block_lse
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.scale, ctx.rows = scale, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _, backward = _cpu_flash_ops()
        query, key, value, out, lse = ctx.saved_tensors
        s, rows = query.shape[2], ctx.rows
        grad_q, grad_k, grad_v = torch.empty_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for mask, start in zip(_block_masks(s, rows, query.dtype, query.device), range(0, s, rows), strict=True):
            end = min(start + rows, s)
            gq, gk, gv = backward(grad_out[:, :, start:end], query[:, :, start:end], key[:, :, :end],
                                  value[:, :, :end], out[:, :, start:end], lse[:, :, start:end], 0.0, mask is None,
                                  attn_mask=mask, scale=ctx.scale)
            grad_q[:, :, start:end] = gq
            grad_k[:, :, :end] += gk
            grad_v[:, :, :end] += gv
        return grad_q, grad_k, grad_v, None, None


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None,
                     block_rows: int | None = None) -> torch.Tensor:
    """Causal attention of s queries over s keys: query/key [b, h(_kv), s, d], value [b, h_kv, s, d_v],
    h % h_kv == 0.

    block_rows: query rows per block; None picks by length and device (block_rows_for), 0 means one call.
    Returns [b, h, s, d_v].
    """
    s = query.shape[2]
    if key.shape[2] != s:
        raise ValueError(f"causal self-attention needs as many keys as queries, got {key.shape[2]} and {s}")
    rows = block_rows_for(s, query.device) if block_rows is None else block_rows
    if not rows or rows >= s:
        return causal_attention_reference(query, key, value, scale)
    d_qk, d_v = query.shape[-1], value.shape[-1]
    if d_qk != d_v:  # MLA (DeepSeek-V3): torch's flash kernels need one head size, so the smaller side gets zero
        # dims, which change no score (the scale stays the query's) and no output dim that is kept
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        if d_v < d_qk:
            return causal_attention(query, key, F.pad(value, (0, d_qk - d_v)), scale, rows)[..., :d_v]
        pad = (0, d_v - d_qk)
        return causal_attention(F.pad(query, pad), F.pad(key, pad), value, scale, rows)
    if torch.is_autocast_enabled(query.device.type):  # as autocast does for SDPA; the ops below are not cast
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if query.device.type == "cpu" and _cpu_flash_ops() is not None:
        return BlockedCausalAttention.apply(query, key, value, scale, rows)
    return _blocks_through_sdpa(query, key, value, scale, rows)


def _blocks_through_sdpa(query, key, value, scale, rows):
    """The same blocks through the public SDPA call (other devices, or a torch without the CPU flash ops)."""
    gqa = query.shape[1] != key.shape[1]
    masks = _block_masks(query.shape[2], rows, query.dtype, query.device)
    outs = []
    for mask, start in zip(masks, range(0, query.shape[2], rows), strict=True):
        end = min(start + rows, query.shape[2])
        q, k, v = query[:, :, start:end], key[:, :, :end], value[:, :, :end]  # [b, h, r, d], [b, h_kv, end, d]
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                                   enable_gqa=gqa))
    return torch.cat(outs, dim=2)

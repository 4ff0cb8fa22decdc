"""Memory of a calibration run: what to expect (for --dry-run) and how to keep the resident set at one layer."""

from __future__ import annotations

import ctypes

BATCH_TOKENS = 4096  # tokens per layer call: activations stay small next to the hidden states


def release_freed_memory() -> None:
    """Hand memory freed inside glibc's heap back to the system.

    glibc raises its mmap threshold to the size of every large block freed (up to 32 MiB), so after the
    first layer, weights and activations come from the heap, where freed blocks between live ones stay in
    the resident set and grow with every layer. malloc_trim returns those pages.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def estimate_memory(config, n_tokens: int, collector_bytes: int, *, seq_len: int = 2048,
                    batch_tokens: int = BATCH_TOKENS, dtype_bytes: int = 4) -> int:
    """Peak bytes a calibration run adds to the process (torch and transformers already imported), for --dry-run.

    config: a config.json dict or a transformers config. collector_bytes: the statistics alive at once (one
    layer's collectors when the consumer drops them before the next layer, all layers' when it keeps them).
    dtype_bytes: of the compute dtype. On a GPU the hidden states (n_tokens * hidden * 4 bytes of this) stay in
    CPU memory, the rest is device memory. Assumes attention without a materialised score matrix (SDPA's
    flash or memory-efficient kernels, which causal masks without padding get).
    """
    c = config if isinstance(config, dict) else config.to_dict()
    hidden, inter, vocab = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    n_heads = c["num_attention_heads"]
    n_kv = c.get("num_key_value_heads") or n_heads
    head_dim = c.get("head_dim") or hidden // n_heads
    q_kv = (n_heads + 2 * n_kv) * head_dim
    states = n_tokens * hidden * 4
    layer = (hidden * (q_kv + n_heads * head_dim) + 3 * hidden * inter + 4 * hidden) * dtype_bytes
    rows = max(1, batch_tokens // seq_len) * min(seq_len, n_tokens)
    # One batch through a layer: norms, residuals, attention output and its transposed copy, q/k/v and their
    # rotated copies, the MLP's three intermediate tensors, the float32 output copy and a collector's float64
    # copy of x; plus BLAS/OpenMP buffers and allocator slack. Measured within 20% of this on CPU.
    work = rows * ((8 * hidden + 3 * q_kv + 3 * inter) * dtype_bytes + hidden * (4 + 8 + 8)) + (8 << 20)
    embedding_phase = vocab * hidden * dtype_bytes + rows * hidden * (dtype_bytes + 4)
    return states + max(embedding_phase, layer + work + collector_bytes)

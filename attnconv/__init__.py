"""attnconv: convert multi-head attention checkpoints into attention with a smaller KV cache."""

__version__ = "0.1.0"

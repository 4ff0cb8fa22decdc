"""One dtype vocabulary for every command: the names users type and what they mean. Torch-free."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPES = ("float32", "bfloat16", "float16")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def canonical_dtype(name: str | torch.dtype | None) -> str | None:
    """'auto'/None -> None (keep the checkpoint's dtype); a name or alias ('bf16') or a torch dtype -> 'bfloat16'.
    Raises ValueError for anything else (settings turn it into a one-line error)."""
    if name is None or name == "auto":
        return None
    key = str(name).removeprefix("torch.")
    key = ALIASES.get(key, key)
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of auto, {', '.join(DTYPES)}")
    return key


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'auto'/None -> None; otherwise the torch dtype."""
    canonical = canonical_dtype(name)
    if canonical is None:
        return None
    import torch

    return getattr(torch, canonical)


def dtype_bytes(dtype: str | torch.dtype) -> int:
    return BYTES[canonical_dtype(dtype) or "float32"]

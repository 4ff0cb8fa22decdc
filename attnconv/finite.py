"""Nothing non-finite is ever written: the source tensors a conversion reads, the calibration statistics it
computes and every tensor it writes are checked, and NaN or Inf is refused in one line that names where it is."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from attnconv.errors import AttnconvError


def _tensors(obj) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, tuple | list):
        for item in obj:
            yield from _tensors(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name))


def _finite(t: torch.Tensor) -> bool:
    # A finite sum means finite elements (NaN or Inf anywhere makes the sum NaN or Inf), read 10-20x faster
    # than isfinite's mask; only a sum that overflows (or a real NaN/Inf) takes the exact test.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def all_finite(obj) -> bool:
    """Whether every floating (or complex) tensor in OBJ (a tensor, or tuples, lists and dataclasses of them)
    holds only finite values; meta tensors hold none."""
    return all(_finite(t) for t in _tensors(obj) if not t.is_meta and (t.is_floating_point() or t.is_complex()))


def source_tensor(name: str, tensor: torch.Tensor, file: Path | str) -> torch.Tensor:
    """TENSOR, read from FILE to be transformed, or a refusal when it holds NaN or Inf."""
    if not all_finite(tensor):
        raise AttnconvError(f"{file}: {name} holds NaN or Inf values, which a conversion would spread; restore "
                            "the checkpoint's weights")
    return tensor


def statistics(stats, layer: int | None = None):
    """STATS, or a refusal when the calibration gave NaN or Inf (activations out of range)."""
    if not all_finite(stats):
        where = f" of layer {layer}" if layer is not None else ""
        raise AttnconvError(f"the calibration statistics{where} hold NaN or Inf values (the source's activations "
                            "on the calibration text leave the float range); check the source, or choose a "
                            "conversion without calibration")
    return stats


def output_tensor(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """TENSOR, about to be written, or a refusal when the conversion made NaN or Inf of finite inputs."""
    if not all_finite(tensor):
        raise AttnconvError(f"converting gave NaN or Inf values in {name} ({tensor.dtype}); nothing was written; "
                            "try another --method or --init, or a wider --dtype")
    return tensor

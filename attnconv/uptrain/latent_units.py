"""Training a DeepSeek-V3 model whose latent norm works as a linear map, in units AdamW can step in.

attnconv's DeepSeek-V3 output makes `kv_a_layernorm` linear (convert/mla/deepseek.py): the latent rows of
`kv_a_proj_with_mqa` are scaled so that the latent's mean square is ~1e-6 of the norm's eps, and the norm's
weight multiplies the scale back. The function is right, but AdamW's step is absolute (about lr per entry,
whatever the entry's size): on latent rows of size ~1e-7 the first step of lr 1e-3 replaced them, and the
distillation KL of a tiny Llama went 0.77 -> 1.24 in one step and stayed there (gradient norm 5.6e5).

So for training, each such layer's latent rows are divided by their scale s (root mean square of the rows'
squared norms) and the norm becomes exactly linear, x * w', with w' = w * s / sqrt(eps): the same function
(to the conversion's 1e-6 share), with parameters of the usual size. Saving multiplies back: the latent rows by
s, the norm's weight w' * sqrt(eps) / s, in the original RMSNorm. A layer whose latent is not that small (any
ordinary DeepSeek-V3 model) is left as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Linear when the latent's mean square, estimated for unit inputs from the rows' norms, is below this share of
# eps: attnconv writes ~1e-6; an ordinary model's latent is ~1e6 times eps.
LINEAR_SHARE = 1e-2


class LinearLatentNorm(nn.Module):
    """kv_a_layernorm in its linear regime, in training units: x * weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.to(x.dtype)


def _latent_layers(model: nn.Module):
    for name, module in model.named_modules():
        if hasattr(module, "kv_a_layernorm") and hasattr(module, "kv_a_proj_with_mqa"):
            yield name, module


def to_training_units(model: nn.Module) -> dict[str, tuple[float, nn.Module]]:
    """Rescale every linear-latent layer of MODEL in place; returns {module name: (s, the original norm)}."""
    units = {}
    for name, module in _latent_layers(model):
        norm, proj = module.kv_a_layernorm, module.kv_a_proj_with_mqa
        if not hasattr(norm, "variance_epsilon"):
            continue
        rank, eps = norm.weight.numel(), float(norm.variance_epsilon)
        with torch.no_grad():
            rows = proj.weight[:rank]
            s = float(rows.double().square().sum(1).mean().sqrt())
            if not 0 < s * s < LINEAR_SHARE * eps:
                continue
            rows.div_(s)
            weight = (norm.weight.detach().double() * (s / eps ** 0.5)).to(norm.weight.dtype)
        units[name] = (s, norm)
        module.kv_a_layernorm = LinearLatentNorm(weight).to(norm.weight.device)
    return units


def from_training_units(model: nn.Module | None, units: dict[str, tuple[float, nn.Module]]) -> None:
    """Undo `to_training_units` on MODEL (the trained model, maybe another object with the same module names;
    None on the processes that do not write it, under FSDP)."""
    if model is None or not units:
        return
    modules = dict(model.named_modules())
    for name, (s, original) in units.items():
        module = modules[name]
        linear = module.kv_a_layernorm
        eps = float(original.variance_epsilon)
        norm = copy.deepcopy(original)
        with torch.no_grad():
            module.kv_a_proj_with_mqa.weight[:linear.weight.numel()].mul_(s)
            norm.weight.copy_((linear.weight.detach().double() * (eps ** 0.5 / s)).to(norm.weight.dtype))
        module.kv_a_layernorm = norm.to(linear.weight.device)

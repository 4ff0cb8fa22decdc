"""Training a DeepSeek-V3 model whose latent norm works as a linear map, in units AdamW can step in.

attnconv's DeepSeek-V3 output makes `kv_a_layernorm` (and `q_a_layernorm`, with a --q-rank below the hidden size)
linear (convert/mla/deepseek.py): the latent rows of `kv_a_proj_with_mqa` (`q_a_proj`) are scaled so that the
latent's mean square is ~1e-6 of the norm's eps, and the norm's weight multiplies the scale back. The function is
right, but AdamW's step is absolute (about lr per entry, whatever the entry's size): on latent rows of size ~1e-7
the first step of lr 1e-3 replaced them, and the distillation KL of a tiny Llama went 0.77 -> 1.24 in one step and
stayed there (gradient norm 5.6e5).

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


# (projection, its norm): the latent rows are the projection's first norm.weight.numel() rows
LATENTS = (("kv_a_proj_with_mqa", "kv_a_layernorm"), ("q_a_proj", "q_a_layernorm"))
_PROJECTION_OF = {norm: proj for proj, norm in LATENTS}


def _latents(model: nn.Module):
    """(key, attention module, projection name, norm name) of every latent norm in MODEL."""
    for name, module in model.named_modules():
        for proj, norm in LATENTS:
            if hasattr(module, proj) and hasattr(module, norm):
                yield f"{name}.{norm}", module, proj, norm


def to_training_units(model: nn.Module) -> dict[str, tuple[float, nn.Module]]:
    """Rescale every linear latent of MODEL in place; returns {module.norm name: (s, the original norm)}."""
    units = {}
    for key, module, proj_name, norm_name in _latents(model):
        norm, proj = getattr(module, norm_name), getattr(module, proj_name)
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
        units[key] = (s, norm)
        setattr(module, norm_name, LinearLatentNorm(weight).to(norm.weight.device))
    return units


def from_training_units(model: nn.Module | None, units: dict[str, tuple[float, nn.Module]]) -> None:
    """Undo `to_training_units` on MODEL (the trained model, maybe another object with the same module names;
    None on the processes that do not write it, under FSDP)."""
    if model is None or not units:
        return
    modules = dict(model.named_modules())
    for key, (s, original) in units.items():
        name, norm_name = key.rsplit(".", 1)
        module = modules[name]
        proj_name = _PROJECTION_OF[norm_name]
        linear = getattr(module, norm_name)
        eps = float(original.variance_epsilon)
        norm = copy.deepcopy(original)
        with torch.no_grad():
            getattr(module, proj_name).weight[:linear.weight.numel()].mul_(s)
            norm.weight.copy_((linear.weight.detach().double() * (eps ** 0.5 / s)).to(norm.weight.dtype))
        setattr(module, norm_name, norm.to(linear.weight.device))

"""Calibration statistics for the calibrated GQA methods: collectors of one layer's attention input.

A collector follows the shared interface (`update(x [n_tokens, hidden] float32, positions [n_tokens])`, x the
hidden state after the layer's input norm) and keeps float64 sums, never activations. `collect_with_hooks`
feeds collectors from forward pre-hooks on a loaded model; the calibration runner (attnconv/calibration/)
replaces it once it lands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor


class InputMomentCollector:
    """E[x~ x~^T] of a layer's attention input with a constant 1 appended (x~ = [x; 1]), so the bias column of
    every projection sees the input mean. All the calibrated GQA methods need: q.k and head outputs are linear
    in x~, and RoPE rotations drop out of the objectives (gqa_align_fit.py)."""

    def __init__(self, hidden: int):
        self.sum = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64)  # [hidden + 1, hidden + 1]
        self.n_tokens = 0

    def update(self, x: Tensor, positions: Tensor) -> None:
        x = x.detach().reshape(-1, self.sum.shape[0] - 1).to(torch.float64)
        xs = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)  # [n_tokens, hidden + 1]
        self.sum.addmm_(xs.T, xs)
        self.n_tokens += len(x)

    def result(self) -> Tensor:
        """[hidden + 1, hidden + 1] float64 second moment; the last row/column hold the mean and 1."""
        if not self.n_tokens:
            raise ValueError("no calibration tokens were collected")
        return self.sum / self.n_tokens


def collect_with_hooks(model, batches: Iterable[Tensor], make: Callable[[int], object]) -> list:
    """Run `model` (a Hugging Face decoder) over token batches [b, t] and feed one collector per layer.

    make(layer_index) -> collector. Positions are arange(t) per sequence, as the model itself uses.
    """
    layers = model.model.layers
    collectors = [make(i) for i in range(len(layers))]
    current: dict[str, Tensor] = {}

    def hook(i):
        def pre(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            collectors[i].update(x.reshape(-1, x.shape[-1]).float(), current["positions"])
        return pre

    handles = [layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for ids in batches:
                current["positions"] = torch.arange(ids.shape[1]).repeat(ids.shape[0])
                model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return collectors

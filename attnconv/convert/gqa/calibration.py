"""Calibration statistics for the calibrated GQA methods: collectors of one layer's attention input.

A collector follows the shared interface (`update(x [n_tokens, hidden] float32, positions [n_tokens])`, x the
hidden state after the layer's input norm) and keeps float64 sums, never activations. `collect_with_hooks`
feeds collectors from forward pre-hooks on a loaded model; the calibration runner (attnconv/calibration/)
replaces it once it lands.

  InputMomentCollector     S = E[x~ x~^T], x~ = [x; 1]: all the methods need.
  AttendedMomentCollector  S and A = E over query heads and positions of sum_n p_hmn x~_n x~_n^T, the key inputs
                           weighted by the attention they receive, from the layer's own (recomputed) attention.
                           As the metric of the key objective it weights logit errors by whether anyone attends
                           to the key: errors on keys no query looks at cannot change the output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from attnconv.convert.attention_weights import AttentionWeights


class InputMomentCollector:
    """E[x~ x~^T] of a layer's attention input with a constant 1 appended (x~ = [x; 1]), so the bias column of
    every projection sees the input mean. All the calibrated GQA methods need: q.k and head outputs are linear
    in x~, and RoPE rotations drop out of the objectives (gqa/align_fit.py)."""

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


class AttendedMomentCollector:
    """S and the attention-weighted second moment A of one layer's key inputs, recomputing the layer's attention.

    layer: the source layer (gqa_heads.AttentionWeights); inv_freq [rotary_dim / 2]: the model's RoPE frequencies
    (rotary_emb.inv_freq, which holds any rope scaling of the frequencies); rope_scale: its attention_scaling
    (cos and sin are multiplied by it); scaling: the logit scale (head_dim ** -0.5 unless the family says
    otherwise); norm_eps: the q/k RMSNorm epsilon (Qwen3); sliding_window: keys older than this many positions
    are masked (Mistral, Qwen2 sliding layers). A new sequence starts wherever the position does not increase.
    """

    def __init__(self, layer: AttentionWeights, inv_freq: Tensor, *, rope_scale: float = 1.0,
                 scaling: float | None = None, norm_eps: float = 1e-6, sliding_window: int | None = None,
                 max_scores: int = 1 << 24):
        self.layer, self.inv_freq, self.rope_scale = layer, inv_freq.double(), rope_scale
        self.scaling = layer.head_dim ** -0.5 if scaling is None else scaling
        self.norm_eps, self.sliding_window, self.max_scores = norm_eps, sliding_window, max_scores
        self.moments = InputMomentCollector(layer.hidden)
        self.attended = torch.zeros_like(self.moments.sum)  # [hidden + 1, hidden + 1]
        self.n_rows = 0  # (query head, query position) pairs: each attention row sums to 1

    def _heads(self, x: Tensor, w: Tensor, b: Tensor | None, norm: Tensor | None, n: int, pos: Tensor) -> Tensor:
        """RoPE'd, normed q or k: [n, t, d] in float32 (what the model computes)."""
        d = self.layer.head_dim
        y = x @ w.float().T + (0 if b is None else b.float())
        y = y.reshape(len(x), n, d).transpose(0, 1)  # [n, t, d]
        if norm is not None:
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.norm_eps) * norm.float()
        r = 2 * len(self.inv_freq)  # rotary dims: d, or a leading part of each head (partial rotary)
        freqs = pos.double()[:, None] * self.inv_freq[None]  # [t, r/2]
        cos = (freqs.cos() * self.rope_scale).float().repeat(1, 2)
        sin = (freqs.sin() * self.rope_scale).float().repeat(1, 2)
        y_rot, y_pass = y[..., :r], y[..., r:]
        rotated = torch.cat([-y_rot[..., r // 2:], y_rot[..., :r // 2]], dim=-1)
        return torch.cat([y_rot * cos + rotated * sin, y_pass], dim=-1)

    def update(self, x: Tensor, positions: Tensor) -> None:
        self.moments.update(x, positions)
        x = x.detach().reshape(-1, self.layer.hidden).float()
        starts = [0, *(torch.nonzero(positions[1:] <= positions[:-1]).flatten() + 1).tolist(), len(x)]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            self._sequence(x[a:b], positions[a:b])

    def _sequence(self, x: Tensor, pos: Tensor) -> None:
        layer, t = self.layer, len(x)
        q = self._heads(x, layer.q, layer.q_bias, layer.q_norm, layer.n_heads, pos)  # [H, t, d]
        k = self._heads(x, layer.k, layer.k_bias, layer.k_norm, layer.n_kv_heads, pos)  # [n_kv, t, d]
        k = k.repeat_interleave(layer.n_heads // layer.n_kv_heads, dim=0)
        age = pos[:, None] - pos[None, :]  # [t, t]: query position - key position
        masked = age < 0 if self.sliding_window is None else (age < 0) | (age >= self.sliding_window)
        received = torch.zeros(t, dtype=torch.float64)  # attention each key receives, summed over heads/queries
        chunk = max(1, self.max_scores // (t * t))
        for h in range(0, layer.n_heads, chunk):
            scores = (q[h:h + chunk] @ k[h:h + chunk].mT * self.scaling).masked_fill(masked, float("-inf"))
            received += scores.softmax(-1).sum((0, 1)).double()
        xs = torch.cat([x.double(), torch.ones(t, 1, dtype=torch.float64)], dim=1)  # [t, hidden + 1]
        self.attended.addmm_(xs.T * received, xs)
        self.n_rows += layer.n_heads * t

    def result(self) -> tuple[Tensor, Tensor]:
        """(S, A), both [hidden + 1, hidden + 1] float64 and normalised per token / per attention row."""
        return self.moments.result(), self.attended / self.n_rows


def attended_collectors(model) -> list[AttendedMomentCollector]:
    """One AttendedMomentCollector per layer of a loaded transformers Llama-like / Phi-3 model."""
    from attnconv.convert.gqa.state_dict import attention_layers

    config, rotary = model.config, model.model.rotary_emb
    collectors = []
    for layer, block in zip(attention_layers(model.state_dict(), config), model.model.layers, strict=True):
        attn = block.self_attn  # Qwen2 keeps its per-layer window here; Mistral and Phi-3 read the config's
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(config, "sliding_window", None)
        collectors.append(AttendedMomentCollector(
            layer, rotary.inv_freq, rope_scale=float(getattr(rotary, "attention_scaling", 1.0)), scaling=attn.scaling,
            norm_eps=getattr(config, "rms_norm_eps", 1e-6), sliding_window=window))
    return collectors


def collect_with_hooks(model, batches: Iterable[Tensor], make: Callable[[int], object] | list) -> list:
    """Run `model` (a Hugging Face decoder) over token batches [b, t] and feed one collector per layer.

    make: make(layer_index) -> collector, or the list of collectors. Positions are arange(t) per sequence, as
    the model itself uses.
    """
    layers = model.model.layers
    collectors = make if isinstance(make, list) else [make(i) for i in range(len(layers))]
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

"""Calibration statistics for MLA conversions, accumulated batch by batch (never the activations).

Every collector follows the shared Collector protocol: `update(x, positions)` with x [n_tokens, hidden], the
attention input of one layer (after its input norm). All sums are float64.

- `MomentCollector`: E[x] and E[x x^T]. Every linear map of x then has its second moment in closed form
  (E[(Wx+b)(Wx+b)^T] = W E[xx^T] W^T + ...), which covers the joint K/V PCA, the K/V balance and RoRoPE's
  per-frequency key covariance (rotating a pair by RoPE leaves a^2 + b^2 and the cross-head products
  a_g a_h + b_g b_h unchanged, so the rotated keys' covariance needs no positions).
- `PairNormCollector`: mean L2 norm of every RoPE pair of q and k (MHA2MLA's 2-norm pair selection).
- `AttentionPhaseCollector`: the source attention's mean rotation per query head and RoPE pair (what a pair
  whose RoPE is dropped should be rotated and scaled by instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnconv.convert.attention_weights import AttentionWeights


@dataclass
class InputMoments:
    """First and second (uncentred) moments of one layer's attention input."""

    mean: Tensor  # [hidden] float64
    second: Tensor  # [hidden, hidden] float64, E[x x^T]
    count: int

    @classmethod
    def identity(cls, hidden: int) -> InputMoments:
        """The weight-only stand-in (E[xx^T] = I, E[x] = 0): PCA under it is the SVD of the weights."""
        return cls(torch.zeros(hidden, dtype=torch.float64), torch.eye(hidden, dtype=torch.float64), 0)

    def augmented(self) -> Tensor:
        """E[[x; 1][x; 1]^T] [hidden + 1, hidden + 1] float64 (the calibrated GQA methods' second moment)."""
        h = self.mean.shape[0]
        aug = torch.empty(h + 1, h + 1, dtype=torch.float64)
        aug[:h, :h], aug[:h, h], aug[h, :h], aug[h, h] = self.second, self.mean, self.mean, 1.0
        return aug

    def root(self) -> Tensor:
        """L [hidden + 1, hidden + 1] with L L^T = E[[x; 1][x; 1]^T] (computed once): the factor of every
        `of_linear`, so a factorisation can work in the input's dimension instead of the outputs'."""
        if getattr(self, "_root", None) is None:
            aug = self.augmented()
            root, info = torch.linalg.cholesky_ex(aug)
            if int(info):  # only positive semi-definite (fewer tokens than dims): the symmetric square root
                vals, vecs = torch.linalg.eigh(aug)
                root = vecs * vals.clamp_min(0).sqrt()
            self._root = root
        return self._root

    def factor_of_linear(self, w: Tensor, b: Tensor | None = None) -> Tensor:
        """B [n, hidden + 1] with B B^T = of_linear(w, b)."""
        wb = torch.cat([w.double(), (b.double() if b is not None else w.new_zeros(w.shape[0]).double())[:, None]], 1)
        return wb @ self.root()

    def of_linear(self, w: Tensor, b: Tensor | None = None) -> Tensor:
        """E[(Wx+b)(Wx+b)^T] for w [n, hidden], b [n] -> [n, n] float64."""
        w = w.double()
        out = w @ self.second @ w.T
        if b is not None:
            b = b.double()
            wm = w @ self.mean  # [n]
            out = out + torch.outer(wm, b) + torch.outer(b, wm) + torch.outer(b, b)
        return out


CHUNK = 4096  # tokens per float32 product of MomentCollector


class MomentCollector:
    def __init__(self, hidden: int):
        self.sum = torch.zeros(hidden, dtype=torch.float64)
        self.sum_outer = torch.zeros(hidden, hidden, dtype=torch.float64)
        self.count = 0

    def update(self, x: Tensor, positions: Tensor) -> None:
        # float32 products of at most CHUNK tokens, summed in float64: ~4x faster than float64 throughout
        # (the dominant cost of a calibrated conversion after the source's own forward), same to ~1e-6
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)
        for start in range(0, x.shape[0], CHUNK):
            part = x[start:start + CHUNK]
            self.sum += part.sum(0, dtype=torch.float64)
            self.sum_outer += (part.T @ part).double()
        self.count += x.shape[0]

    def result(self) -> InputMoments:
        if self.count == 0:
            raise ValueError("no calibration tokens were seen")
        return InputMoments(self.sum / self.count, self.sum_outer / self.count, self.count)


def _rms_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    if weight is None:
        return x
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def pair_norms(heads: Tensor, rotary_dim: int) -> Tensor:
    """L2 norm of each RoPE pair: heads [..., head_dim] -> [..., rotary_dim / 2]."""
    half = rotary_dim // 2
    return torch.sqrt(heads[..., :half] ** 2 + heads[..., half:rotary_dim] ** 2)


class PairNormCollector:
    """Mean |q pair| per query head and mean |k pair| per KV head (after Qwen3's q/k norms)."""

    def __init__(self, weights: AttentionWeights):
        self.w = weights
        s = weights.shape
        self.q_sum = torch.zeros(s.n_heads, s.rotary_pairs, dtype=torch.float64)
        self.k_sum = torch.zeros(s.n_kv_heads, s.rotary_pairs, dtype=torch.float64)
        self.count = 0

    def update(self, x: Tensor, positions: Tensor) -> None:
        w, s = self.w, self.w.shape
        x = x.detach().reshape(-1, s.hidden).float()
        for which, acc in (("q", self.q_sum), ("k", self.k_sum)):
            y = torch.nn.functional.linear(x, getattr(w, which), getattr(w, f"{which}_bias"))
            y = _rms_norm(y.reshape(x.shape[0], -1, s.head_dim), getattr(w, f"{which}_norm"), w.norm_eps)
            acc += pair_norms(y, s.rotary_dim).sum(0).double()  # [n_heads or n_kv, pairs]
        self.count += x.shape[0]

    def result(self) -> tuple[Tensor, Tensor]:
        """(mean q pair norms [n_heads, pairs], mean k pair norms [n_kv, pairs]), float64."""
        if self.count == 0:
            raise ValueError("no calibration tokens were seen")
        return self.q_sum / self.count, self.k_sum / self.count


def _rope(x: Tensor, positions: Tensor, inv_freq: Tensor, rotary_dim: int) -> Tensor:
    """HF rotate_half RoPE of x [t, n, head_dim] at positions [t]."""
    angles = positions[:, None].float() * inv_freq[None].float()  # [t, pairs]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [t, 1, pairs]
    half = rotary_dim // 2
    a, b = x[..., :half], x[..., half:rotary_dim]
    return torch.cat([a * cos - b * sin, b * cos + a * sin, x[..., rotary_dim:]], dim=-1)


class AttentionPhaseCollector:
    """Per query head and RoPE pair, the source's attention-weighted mean rotation: E_q[sum_k p(q, k) e^{i theta
    (pos_q - pos_k)}] (complex, |.| <= 1). Dropping a pair's RoPE (NoPE) replaces the rotation by 1; replacing it
    by this mean instead is the least-squares choice under the source's attention, a scaled rotation of the
    query pair that folds into the query weights (mla_rope.apply_phases).

    x must hold whole causal sequences, each starting at position 0 (the calibration runner's windows).
    inv_freq: [rotary_dim / 2] the source rotary's frequencies (with any RoPE scaling applied).
    """

    def __init__(self, weights: AttentionWeights, inv_freq: Tensor):
        self.w, self.inv_freq = weights, inv_freq.detach().double()
        s = weights.shape
        self.sum = torch.zeros(s.n_heads, s.rotary_pairs, dtype=torch.complex128)
        self.count = 0

    def update(self, x: Tensor, positions: Tensor) -> None:
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        for a, b in zip(starts[:-1], starts[1:], strict=False):
            self._sequence(x[a:b].float(), positions[a:b])

    def _sequence(self, x: Tensor, pos: Tensor) -> None:
        w, s = self.w, self.w.shape
        t = x.shape[0]
        q = torch.nn.functional.linear(x, w.q, w.q_bias).reshape(t, s.n_heads, s.head_dim)
        k = torch.nn.functional.linear(x, w.k, w.k_bias).reshape(t, s.n_kv_heads, s.head_dim)
        q = _rope(_rms_norm(q, w.q_norm, w.norm_eps), pos, self.inv_freq, s.rotary_dim)
        k = _rope(_rms_norm(k, w.k_norm, w.norm_eps), pos, self.inv_freq, s.rotary_dim)
        k = k[:, s.kv_head_of()]  # [t, n_heads, d]
        angle = pos[:, None].double() * self.inv_freq[None]  # [t, pairs]
        key_phase = torch.cat([angle.cos(), -angle.sin()], 1).float()  # e^{-i angle} as [re | im]: [t, 2 pairs]
        pairs = angle.shape[1]
        # sum_k p(q, k) e^{-i theta k} is attention with the key phases as values: the fused causal kernel never
        # holds the [heads, t, t] probabilities (3x faster than scores, softmax and a product, at 2,048 tokens)
        # (4-D inputs: torch runs 3-D ones on its unfused path, 2.5x slower than the old loop)
        values = key_phase[None, None].expand(1, s.n_heads, t, 2 * pairs).contiguous()  # [1, H, t, 2 pairs]
        mean = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], values, is_causal=True,
            scale=s.scaling)[0].double()  # [H, t, 2 pairs]
        mean_key = torch.complex(mean[..., :pairs], mean[..., pairs:])
        self.sum += (mean_key * torch.exp(1j * angle)[None]).sum(1)  # times the query's own phase e^{i theta q}
        self.count += t

    def result(self) -> Tensor:
        """[n_heads, rotary_dim / 2] complex128."""
        if self.count == 0:
            raise ValueError("no calibration tokens were seen")
        return self.sum / self.count

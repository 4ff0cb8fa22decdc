"""Which RoPE pairs an MLA keeps, and the rotations that move position information into them.

Pairs are HF rotate_half pairs: pair i of a head is dims (i, i + rotary_dim / 2), frequency theta^(-2i/rotary_dim).

attnconv format (after MHA2MLA): each KV head keeps `rope_dim / 2` of its own pairs, chosen per layer and head
by `--rope-select`: high (the first, fastest pairs), low (the last), uniform (evenly spaced, starting at pair 0)
or 2-norm (largest mean |q pair| x mean |k pair| summed over the head's query group, from calibration data).

deepseek-v3 format (after TransMLA's RoRoPE): one RoPE key of `rope_dim` dims shared by all heads. DeepSeek's
rotary gives its pair i the frequency theta'^(-2i/rope_dim), so the kept source pairs must be 0, s, 2s, ... for
an integer step s, with theta' = theta^(s * rope_dim / rotary_dim): s = 1 keeps the fastest pairs ("high"),
s = pairs / kept spreads them ("uniform"). Per kept pair, an orthogonal G x G rotation across the KV heads
(the principal axes of the keys at that frequency) concentrates the keys' energy in its first component, which
becomes the shared RoPE key; the same real rotation applied to both halves of a pair commutes with RoPE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnconv.convert.attention_weights import AttentionShape
from attnconv.errors import AttnconvError

ROPE_SELECTIONS = ("2-norm", "high", "low", "uniform")
SHARED_ROPE_SELECTIONS = ("high", "uniform")


def check_rope_dim(rope_dim: int, shape: AttentionShape, what: str = "--rope-dim") -> int:
    """The number of pairs kept, or a one-line refusal."""
    if rope_dim % 2 or rope_dim < 2:
        raise AttnconvError(f"{what} {rope_dim} must be an even number >= 2 (RoPE rotates dims in pairs)")
    if rope_dim > shape.rotary_dim:
        raise AttnconvError(f"{what} {rope_dim} exceeds the {shape.rotary_dim} RoPE dims of a head; choose an "
                            f"even number up to {shape.rotary_dim}")
    return rope_dim // 2


def pair_scores(q_pair_norms: Tensor, k_pair_norms: Tensor, shape: AttentionShape) -> Tensor:
    """MHA2MLA's 2-norm score of every pair of every KV head: sum over its query heads of |q pair| x |k pair|.

    q_pair_norms [n_heads, pairs], k_pair_norms [n_kv, pairs] -> [n_kv, pairs]
    """
    q = q_pair_norms.reshape(shape.n_kv_heads, shape.group_size, -1).sum(1)
    return q * k_pair_norms


def select_pairs(method: str, shape: AttentionShape, n_keep: int, scores: Tensor | None = None) -> Tensor:
    """Kept pair indices per KV head, sorted: [n_kv, n_keep] int64."""
    n_pairs = shape.rotary_pairs
    if method == "high":
        one = torch.arange(n_keep)
    elif method == "low":
        one = torch.arange(n_pairs - n_keep, n_pairs)
    elif method == "uniform":
        one = torch.arange(n_keep) * n_pairs // n_keep
    elif method == "2-norm":
        if scores is None:
            raise AttnconvError("--rope-select 2-norm needs calibration data (pair norms of q and k); "
                                "pass --calibrate SPEC (or leave the default text) or choose high, low or uniform")
        return scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values
    else:
        raise AttnconvError(f"--rope-select {method!r} is not one of {', '.join(ROPE_SELECTIONS)}")
    return one.expand(shape.n_kv_heads, n_keep).clone()


def shared_frequencies(method: str, shape: AttentionShape, n_keep: int) -> tuple[Tensor, int]:
    """Source pairs behind DeepSeek's shared RoPE key ([n_keep] = 0, s, 2s, ...) and the step s."""
    if method not in SHARED_ROPE_SELECTIONS:
        raise AttnconvError(f"--rope-select {method} cannot be expressed in the deepseek-v3 format, whose rotary "
                            f"frequencies form one geometric series from 1; use {' or '.join(SHARED_ROPE_SELECTIONS)}"
                            ", or --format attnconv")
    step = 1 if method == "high" else shape.rotary_pairs // n_keep
    return torch.arange(n_keep) * step, step


def principal_rotations(key_second_moment: Tensor, shape: AttentionShape, pairs: Tensor) -> Tensor:
    """RoRoPE: per kept pair, the principal axes of the keys across KV heads, strongest first.

    key_second_moment: E[k k^T] of all KV heads' keys [n_kv * head_dim, n_kv * head_dim]; pairs [n]
    -> [n, n_kv, n_kv] float64, columns orthonormal (column 0 becomes the shared RoPE key)
    """
    g, d, half = shape.n_kv_heads, shape.head_dim, shape.rotary_dim // 2
    c = key_second_moment.double().reshape(g, d, g, d)
    rotations = []
    for p in pairs.tolist():
        cov = c[:, p, :, p] + c[:, p + half, :, p + half]  # [g, g]: sum of both halves' products
        _, vecs = torch.linalg.eigh(cov)
        vecs = vecs.flip(-1)  # descending eigenvalues
        sign = torch.sign(vecs.gather(0, vecs.abs().argmax(0, keepdim=True)))  # fixed signs: deterministic output
        rotations.append(vecs * torch.where(sign == 0, 1.0, sign))
    return torch.stack(rotations)


def interleave_permutation(rope_dim: int) -> Tensor:
    """Index that reorders a rotate_half vector [a_0..a_n-1, b_0..b_n-1] into DeepSeek's [a_0, b_0, a_1, b_1, ...]."""
    n = rope_dim // 2
    return torch.stack([torch.arange(n), torch.arange(n) + n], dim=-1).flatten()


def apply_phases(q_heads: Tensor, phases: Tensor, pairs: Tensor, rotary_dim: int) -> Tensor:
    """Multiply query pairs (as complex a + ib) by the source's mean rotation for pairs whose RoPE is dropped.

    q_heads: [n_heads, head_dim, *rest] query weights or biases; phases: [n_heads, rotary_dim / 2] complex
    (AttentionPhaseCollector); pairs: [n_heads, m] the pairs of each query head that become NoPE.
    """
    half = rotary_dim // 2
    out = q_heads.clone()
    beta = phases.gather(1, pairs)  # [n_heads, m]
    shape = (*pairs.shape, *([1] * (q_heads.dim() - 2)))
    re, im = beta.real.float().reshape(shape), beta.imag.float().reshape(shape)
    index = pairs.reshape(shape).expand(*pairs.shape, *q_heads.shape[2:])
    a, b = q_heads.gather(1, index), q_heads.gather(1, index + half)
    out.scatter_(1, index, re * a - im * b)
    out.scatter_(1, index + half, im * a + re * b)
    return out


def shared_rope_key(k_heads: Tensor, u: Tensor, pairs: Tensor, rotary_dim: int) -> tuple[Tensor, Tensor]:
    """RoRoPE's shared RoPE key and what each KV head's key keeps beside it.

    k_heads: [n_kv, head_dim, *rest] key weights (or biases); u: [n_keep, n_kv] each KV head's share of the shared
    key per kept pair (principal_rotations' first column); pairs [n_keep].
    -> the shared key [rope_dim, *rest] in rotate_half order (first halves, then second halves), and the NoPE keys
    [n_kv, head_dim, *rest]: each head's key minus its share of the shared one (zero where it is all of it).
    """
    half = rotary_dim // 2
    share = u.reshape(*u.shape, *([1] * (k_heads.dim() - 2))).to(k_heads.dtype)  # [n_keep, n_kv, 1...]
    first = (share * k_heads[:, pairs].transpose(0, 1)).sum(1)  # [n_keep, *rest]
    second = (share * k_heads[:, pairs + half].transpose(0, 1)).sum(1)
    nope = k_heads.clone()
    nope[:, pairs] -= share.transpose(0, 1) * first[None]
    nope[:, pairs + half] -= share.transpose(0, 1) * second[None]
    return torch.cat([first, second]), nope


def shared_rope_queries(q_heads: Tensor, u_of_head: Tensor, pairs: Tensor, rotary_dim: int) -> Tensor:
    """The query side of a shared RoPE key: each query head's kept pairs times its KV head's share.

    q_heads: [n_heads, head_dim, *rest]; u_of_head: [n_heads, n_keep] (u.T per query head's KV head)
    -> [n_heads, rope_dim, *rest] in rotate_half order.
    """
    half = rotary_dim // 2
    share = u_of_head.reshape(*u_of_head.shape, *([1] * (q_heads.dim() - 2))).to(q_heads.dtype)
    return torch.cat([share * q_heads[:, pairs], share * q_heads[:, pairs + half]], dim=1)

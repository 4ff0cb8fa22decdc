"""MHA -> GQA/MQA as pure tensor functions (no IO), after Ainslie et al. 2023 ("GQA").

Key/value heads are merged within contiguous groups: query head j attends to KV head j // group_size,
so merging KV heads [g*i, g*(i+1)) into head i keeps every query head with the heads it used.
Computation is in float32; callers cast the result to the output dtype. Functions also accept meta
tensors, which is how a dry run learns every output shape without reading a byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor

from attnconv.convert.gqa.methods import Method
from attnconv.model_shape import HeadLayout


def _mean(groups: Tensor, gen: torch.Generator | None, is_bias: bool) -> Tensor:
    return groups.mean(dim=1)


def _first(groups: Tensor, gen: torch.Generator | None, is_bias: bool) -> Tensor:
    return groups[:, 0]


def _random(groups: Tensor, gen: torch.Generator | None, is_bias: bool) -> Tensor:
    # The paper's third ablation: fresh random heads, scaled like the source's, biases at zero.
    shape = (groups.shape[0], *groups.shape[2:])
    if is_bias or groups.is_meta:
        return groups.new_zeros(shape)
    return torch.randn(shape, generator=gen, dtype=torch.float32) * groups.float().std()


# The tensor function of each method that merges one tensor at a time: [n_out, g, ...] -> [n_out, ...]. The
# calibrated methods convert a whole layer at a time (gqa/calibrated.py).
MERGES: dict[str, Callable[[Tensor, torch.Generator | None, bool], Tensor]] = {
    "mean": _mean, "first": _first, "random": _random}


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A generator per tensor, so `random` gives the same heads whatever the order of work."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def pool_heads(heads: Tensor, n_out: int, method: Method, gen: torch.Generator | None = None,
               is_bias: bool = False) -> Tensor:
    """Merge contiguous groups of heads.

    heads: [n_in, head_dim, *rest] (rest = [hidden] for weights, [] for biases) -> [n_out, head_dim, *rest]
    """
    n_in = heads.shape[0]
    if n_in % n_out:
        raise ValueError(f"{n_out} output heads do not divide {n_in} input heads")
    if heads.is_meta:  # shape inference for the plan; meta reductions go through slow Python decompositions
        return heads.new_empty((n_out, *heads.shape[1:]), dtype=torch.float32)
    groups = heads.float().reshape(n_out, n_in // n_out, *heads.shape[1:])  # [n_out, g, head_dim, *rest]
    return MERGES[method.name](groups, gen, is_bias)


def convert_kv_proj(w: Tensor, layout: HeadLayout, n_out: int, method: Method,
                    gen: torch.Generator | None = None) -> Tensor:
    """A separate K or V projection (Linear layout).

    w: [n_kv * head_dim, hidden] weight or [n_kv * head_dim] bias -> [n_out * head_dim, ...]
    """
    is_bias = w.dim() == 1
    heads = w.reshape(layout.n_kv_heads, layout.head_dim, *w.shape[1:])  # [n_kv, head_dim, *rest]
    return pool_heads(heads, n_out, method, gen, is_bias).reshape(n_out * layout.head_dim, *w.shape[1:])


def convert_fused_qkv(w: Tensor, layout: HeadLayout, n_out: int, method: Method,
                      gens: tuple[torch.Generator | None, torch.Generator | None] = (None, None)) -> Tensor:
    """A fused projection with rows q | k | v (Phi-3 qkv_proj).

    w: [(n_heads + 2 n_kv) * head_dim, hidden] -> [(n_heads + 2 n_out) * head_dim, hidden]
    """
    q_rows, kv_rows = layout.n_heads * layout.head_dim, layout.n_kv_heads * layout.head_dim
    q, k, v = w.split([q_rows, kv_rows, kv_rows], dim=0)
    k = convert_kv_proj(k, layout, n_out, method, gens[0])
    v = convert_kv_proj(v, layout, n_out, method, gens[1])
    return torch.cat([q.float(), k, v], dim=0)


def convert_gpt2_c_attn(w: Tensor, layout: HeadLayout, n_out: int, method: Method,
                        gens: tuple[torch.Generator | None, torch.Generator | None] = (None, None)) -> Tensor:
    """GPT-2's Conv1D c_attn -> GPTBigCode's Linear c_attn.

    weight: [hidden, 3 hidden] (Conv1D: in x out, columns q | k | v) or bias [3 hidden]
    -> MQA (n_out = 1): [hidden + 2 head_dim, hidden], rows q | k | v
    -> MHA (n_out = n_heads): [3 hidden, hidden], rows interleaved per head q_h | k_h | v_h (GPTBigCode's MHA form)
    """
    is_bias = w.dim() == 1
    wt = w if is_bias else w.t()  # [3 hidden, hidden] or [3 hidden]
    q, k, v = wt.split(layout.hidden, dim=0)
    k = convert_kv_proj(k, layout, n_out, method, gens[0])
    v = convert_kv_proj(v, layout, n_out, method, gens[1])
    if n_out == 1:
        return torch.cat([q.float(), k, v], dim=0)
    rest = wt.shape[1:]
    per_head = [t.float().reshape(layout.n_heads, layout.head_dim, *rest) for t in (q, k, v)]
    return torch.stack(per_head, dim=1).reshape(3 * layout.hidden, *rest)  # [n_heads, 3, head_dim, *rest]

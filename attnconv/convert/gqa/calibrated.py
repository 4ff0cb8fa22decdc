"""Calibrated MHA -> GQA/MQA starting points: `grouped`, `aligned`, `fit`, composable as `grouped+aligned+fit`.

Mean pooling of contiguous heads (gqa/pool.py) ignores which heads resemble each other and how each is used. These
methods read calibration statistics of each layer's attention input x~ = [x; 1] (gqa/calibration.py): its
second moment S, and optionally the attended moment A (each token weighted by the attention it receives as a
key), which then replaces S as the metric of keys and values and gives clearly better starting points. In order:

  grouped  choose which KV heads share a group (balanced, every group the same size) by the cost of the merge
           that follows, then permute heads so each group is contiguous: KV heads with their query heads,
           q rows and biases and the o_proj columns that read them. A permutation: the unmerged layer is
           unchanged, and when the contiguous grouping is best the result is exactly the plain merge.
  aligned  rotate each head onto its group's frame before merging (generalised Procrustes), compensating
           so the unmerged layer is unchanged: value heads by any orthogonal map (its inverse on the o_proj
           columns of their query heads), key heads by one 2x2 rotation per RoPE pair (the only orthogonal
           maps that commute with RoPE), applied to their query heads too.
  fit      merge by least squares (gqa/align_fit.py) instead of the mean: the merged key per RoPE pair and a
           RoPE-commuting complex factor per query head, and the merged value head with a d x d map on each
           query head's o_proj columns, minimising the error of every query head's logits and outputs on
           calibration data. The mean is one feasible point, so fit never ends above it on its objective.

Without `fit` the merge is the plain mean. Exactness with per-head q/k RMSNorm (Qwen3: one weight gamma per dim,
shared by all heads): a rotation of pair p commutes with the norm only when gamma[p] == gamma[p + d/2] for both
norms, so `aligned` rotates only those pairs and stays exact; `fit` keeps its value maps (no norm on values) but
compensates keys only by those exact rotations (any non-unit factor would change the norm) and merges them as the
query-energy-weighted mean per pair, the optimum given that. The objectives ignore the norms (pre-norm q/k).
Everything comes back with a JSON-able record of each choice. RoPE must be HF rotate_half (pair p = dims p and
p + d/2); models without RoPE (GPT-2) are not handled here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor

from attnconv import finite
from attnconv.convert.gqa.align_fit import align_keys, align_values, fit_residuals, fitted_merge, rotated
from attnconv.convert.gqa.grouping import best_grouping, contiguous
from attnconv.convert.gqa.heads import (
    AttentionWeights,
    Geometry,
    Heads,
    Merge,
    from_heads,
    from_pairs,
    geometry,
    key_objective,
    mean_merge,
    ridged,
    to_heads,
    to_pairs,
    value_objective,
)
from attnconv.convert.gqa.methods import Method, parse_method
from attnconv.errors import AttnconvError

DEFAULT_RIDGE = 1e-3


def calibrated_steps(method: Method | str) -> tuple[str, ...]:
    """The calibrated steps of METHOD in pipeline order (() for mean); a string is parsed as --method is."""
    method = parse_method(method) if isinstance(method, str) else method
    if not method.calibrated and method.name != "mean":
        raise AttnconvError(f"--method {method.name} merges one tensor at a time (convert/gqa/pool.py), not a layer: "
                            "use mean or the calibrated methods here")
    return method.steps


def rotatable_pairs(heads: Heads) -> Tensor:
    """[d/2] bool: pairs whose rotation commutes with the per-head q/k norms (all pairs without norms)."""
    ok = torch.ones(heads.head_dim // 2, dtype=torch.bool)
    for norm in (heads.q_norm, heads.k_norm):
        if norm is not None:
            half = heads.head_dim // 2
            ok &= norm[:half] == norm[half:]
    return ok


def _permute(heads: Heads, kv_order: list[int]) -> Heads:
    g = heads.queries_per_kv
    q_order = [j * g + i for j in kv_order for i in range(g)]
    return replace(heads, q=heads.q[q_order], k=heads.k[kv_order], v=heads.v[kv_order], o=heads.o[q_order])


def _rotate(heads: Heads, key_phase: Tensor, value_rot: Tensor) -> Heads:
    """key_phase [n_kv, d/2] unit complex, value_rot [n_kv, d, d] orthogonal: a function-preserving change."""
    g = heads.queries_per_kv
    per_query = key_phase.repeat_interleave(g, dim=0)[:, :, None]
    q = from_pairs(to_pairs(heads.q) * per_query)
    k = from_pairs(to_pairs(heads.k) * key_phase[:, :, None])
    v = value_rot @ heads.v
    o = heads.o @ value_rot.repeat_interleave(g, dim=0).mT
    return replace(heads, q=q, k=k, v=v, o=o)


def _merge(heads: Heads, merges: list[Merge]) -> Heads:
    """Merge each contiguous group with its coefficients (gqa_heads.Merge)."""
    n_out, g = len(merges), heads.queries_per_kv
    size = heads.n_kv // n_out
    key_mix = torch.cat([m.key_mix for m in merges])  # [n_kv, d/2]
    key_comp = torch.cat([m.key_comp for m in merges])
    value_mix = torch.cat([m.value_mix for m in merges])  # [n_kv, d, d]
    value_comp = torch.cat([m.value_comp for m in merges])
    kc = (to_pairs(heads.k) * key_mix[:, :, None]).reshape(n_out, size, *key_mix.shape[1:], -1).sum(1)
    v = (value_mix @ heads.v).reshape(n_out, size, *heads.v.shape[1:]).sum(1)
    q = from_pairs(to_pairs(heads.q) * key_comp.conj().repeat_interleave(g, dim=0)[:, :, None])
    o = heads.o @ value_comp.repeat_interleave(g, dim=0)
    return replace(heads, q=q, k=from_pairs(kc), v=v, o=o)


def _relative(geom: Geometry, merges: list[Merge], size: int) -> dict:
    """The objectives of a merge of contiguous groups, relative to the layer's total logit/output energy."""
    keys = sum(key_objective(geom.subset(list(range(g * size, (g + 1) * size))), m) for g, m in enumerate(merges))
    values = sum(value_objective(geom.subset(list(range(g * size, (g + 1) * size))), m)
                 for g, m in enumerate(merges))
    return {"keys": float(keys / geom.key_energy), "values": float(values / geom.value_energy)}


def _digest(t: Tensor) -> str:
    return hashlib.sha256(t.double().contiguous().numpy().tobytes()).hexdigest()[:16]


@contextmanager
def _head_space(heads: Heads) -> Iterator[None]:
    """One thread for the head-space work of small layers: thousands of d x d operations, where intra-op threads
    only add synchronisation (16x slower on a busy 2-core machine). Large layers (n_kv * d > 1024: eigh of up
    to (n_kv d)^2 for MQA) and the hidden-size Grams keep all threads."""
    threads = torch.get_num_threads()
    if heads.n_kv * heads.head_dim <= 1024:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _check(layer: AttentionWeights, second_moment: Tensor | None, n_out: int, steps: tuple[str, ...]) -> None:
    if n_out < 1 or layer.n_kv_heads % n_out:
        raise AttnconvError(f"{n_out} KV heads do not divide the layer's {layer.n_kv_heads}")
    if steps and second_moment is None:
        raise AttnconvError(f"GQA method {'+'.join(steps)} needs calibration statistics (the attention input's "
                            "second moment per layer)")
    finite.statistics(second_moment)


def _arrange(heads: Heads, s: tuple[Tensor, Tensor | None], n_out: int, steps: tuple[str, ...], seed: int,
             record: dict) -> tuple[Heads, Geometry]:
    """grouped (permutation) and aligned (rotations) on the unmerged heads; fills RECORD."""
    size, d = heads.n_kv // n_out, heads.head_dim
    rotatable = rotatable_pairs(heads)
    norms = None if heads.q_norm is None and heads.k_norm is None else rotatable
    geom = geometry(heads, *s)  # the only hidden-size products; permutations and rotations then map the Grams
    with _head_space(heads):
        record["objective"] = {"mean": _relative(geom, [mean_merge(size, d)] * n_out, size)}
        kv_order = list(range(heads.n_kv))
        if "grouped" in steps:
            def cost(group: tuple[int, ...]) -> float:
                g = geom.subset(list(group))
                if "fit" in steps and norms is None:  # full compensation: alignment cannot change the optimum
                    keys, values = fit_residuals(g)
                else:
                    if "aligned" in steps:
                        g = rotated(g, align_keys(g, rotatable), align_values(g))
                    m = fitted_merge(g, norms) if "fit" in steps else mean_merge(size, d)
                    keys, values = key_objective(g, m), value_objective(g, m)
                return float(keys / geom.key_energy + values / geom.value_energy)

            groups, record["grouping"] = best_grouping(heads.n_kv, size, cost, seed)
            kv_order = [j for group in groups for j in group]
            heads, geom = _permute(heads, kv_order), geom.subset(kv_order)
        record["groups"] = [kv_order[g * size:(g + 1) * size] for g in range(n_out)]
        record["query_order"] = [j * heads.queries_per_kv + i for j in kv_order for i in range(heads.queries_per_kv)]
        if "aligned" in steps:
            subs = [geom.subset(list(range(g * size, (g + 1) * size))) for g in range(n_out)]
            key_phase = torch.cat([align_keys(sub, rotatable) for sub in subs])  # [n_kv, d/2]
            value_rot = torch.cat([align_values(sub) for sub in subs])  # [n_kv, d, d]
            heads, geom = _rotate(heads, key_phase, value_rot), rotated(geom, key_phase, value_rot)
            record["alignment"] = {
                "rotatable_pairs": int(rotatable.sum()),
                "key_angles": key_phase.angle().tolist(),  # [kv head, in the new order][pair], radians
                "value_maps": [{"det": round(float(torch.linalg.det(r))), "sha256_16": _digest(r),
                                "deviation": float((r - torch.eye(d, dtype=r.dtype)).norm())} for r in value_rot],
                "objective_after": _relative(geom, [mean_merge(size, d)] * n_out, size)}
    return heads, geom


def _metrics(second_moment: Tensor, attended_moment: Tensor | None, ridge: float) -> tuple[Tensor, Tensor | None]:
    return ridged(second_moment, ridge), None if attended_moment is None else ridged(attended_moment, ridge)


def arrange_layer(layer: AttentionWeights, second_moment: Tensor, n_out: int, method: Method | str, *,
                  attended_moment: Tensor | None = None, ridge: float = DEFAULT_RIDGE,
                  seed: int = 0) -> tuple[AttentionWeights, dict]:
    """Only the function-preserving part of METHOD: the layer, still with all its KV heads, after `grouped`'s
    permutation and `aligned`'s rotations (each future group contiguous and in one frame), and the record."""
    steps = calibrated_steps(method)
    _check(layer, second_moment, n_out, steps)
    record: dict = {"methods": list(steps), "kv_heads": n_out, "ridge": ridge,
                    "key_value_metric": "input" if attended_moment is None else "attended"}
    heads, _ = _arrange(to_heads(layer), _metrics(second_moment, attended_moment, ridge), n_out, steps, seed, record)
    return from_heads(heads, layer), record


def convert_layer(layer: AttentionWeights, second_moment: Tensor | None, n_out: int,
                  method: Method | str = "mean", *, attended_moment: Tensor | None = None,
                  ridge: float = DEFAULT_RIDGE, seed: int = 0) -> tuple[AttentionWeights, dict]:
    """Merge LAYER's KV heads into n_out by METHOD; returns the new layer (float32) and a JSON-able record.

    second_moment: [hidden + 1, hidden + 1] E[x~ x~^T] of the layer's attention input x~ = [x; 1]
    (gqa_calibration.InputMomentCollector); not needed for 'mean'. attended_moment: the same weighted by the
    attention each token receives as a key (gqa_calibration.AttendedMomentCollector), the metric of the key and
    value objectives when given (S still weighs the queries); better starting points (see the benchmark).
    ridge: relative diagonal loading of both for every least-squares solve. seed: the restarts of the grouping
    search on layers too large to enumerate.
    Record: groups (source KV heads per output head), query_order (source query head of each output query
    head), the grouping search, alignment angles/maps, and the objectives (relative to the layer's logit and
    output energy) of the contiguous plain mean and of the result.
    """
    steps = calibrated_steps(method)
    _check(layer, second_moment, n_out, steps)
    heads, size = to_heads(layer), layer.n_kv_heads // n_out
    record: dict = {"methods": list(steps) or ["mean"], "kv_heads": n_out, "ridge": ridge,
                    "key_value_metric": "input" if attended_moment is None else "attended"}
    if not steps:
        record["groups"] = [list(g) for g in contiguous(layer.n_kv_heads, size)]
        return from_heads(_merge(heads, [mean_merge(size, layer.head_dim)] * n_out), layer), record
    heads, geom = _arrange(heads, _metrics(second_moment, attended_moment, ridge), n_out, steps, seed, record)
    compensate = heads.q_norm is None and heads.k_norm is None
    norms = None if compensate else rotatable_pairs(heads)
    subs = [geom.subset(list(range(g * size, (g + 1) * size))) for g in range(n_out)]
    with _head_space(heads):
        merges = [fitted_merge(sub, norms) if "fit" in steps else mean_merge(size, layer.head_dim) for sub in subs]
        record["objective"]["final"] = _relative(geom, merges, size)
        merged = _merge(heads, merges)
    if "fit" in steps:
        record["fit"] = {"key_compensation": compensate,
                         "key_factor_abs": [[float(x) for x in m.key_comp.abs().flatten()] for m in merges]}
    return from_heads(merged, layer), record

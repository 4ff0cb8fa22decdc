"""The convert op vocabulary: every op a plan step can name, what the plan report says of it, and its tensor
function. Families (attnconv/families.py) name the op for each attention tensor; the plan runs it; the report
prints its help. A new conversion is a new entry here, not a new branch elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from attnconv.convert.gqa.methods import Method
from attnconv.convert.gqa.pool import convert_fused_qkv, convert_gpt2_c_attn, convert_kv_proj
from attnconv.model_shape import HeadLayout


@dataclass(frozen=True)
class Step:
    """One output tensor: `op` (a name in ops.py) applied to `inputs` (one input for GQA by mean/first/random;
    a layer's steps (MLA, calibrated GQA) take all its attention tensors)."""

    output: str
    inputs: tuple[str, ...]
    op: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: str
    raw: bool = False  # copied as bytes, never decoded
    layer: int | None = None  # MLA, calibrated GQA: the layer whose one computation gives this output
    key: str | None = None  # which output of it; deepseek_tensor: the transform

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


class Plan(Protocol):
    """What an op reads of the plan running it (convert/plan.py's Plan)."""

    layout_in: HeadLayout
    layout_out: HeadLayout
    method: Method

    def generator(self, step: Step, part: str) -> torch.Generator | None: ...

    def layer_output(self, step: Step, inputs: list[Tensor]) -> Tensor: ...


@dataclass(frozen=True)
class Op:
    """A named tensor function: (plan, step, input tensors) -> the step's output; it also runs on meta tensors,
    which is how a plan learns every output shape before reading a byte."""

    name: str
    help: str
    run: Callable[[Plan, Step, list[Tensor]], Tensor]


def _kv_proj(plan: Plan, step: Step, x: list[Tensor]) -> Tensor:
    return convert_kv_proj(x[0], plan.layout_in, plan.layout_out.n_kv_heads, plan.method, plan.generator(step, ""))


def _fused_qkv(plan: Plan, step: Step, x: list[Tensor]) -> Tensor:
    gens = (plan.generator(step, ":k"), plan.generator(step, ":v"))
    return convert_fused_qkv(x[0], plan.layout_in, plan.layout_out.n_kv_heads, plan.method, gens)


def _gpt2_c_attn(plan: Plan, step: Step, x: list[Tensor]) -> Tensor:
    gens = (plan.generator(step, ":k"), plan.generator(step, ":v"))
    return convert_gpt2_c_attn(x[0], plan.layout_in, plan.layout_out.n_kv_heads, plan.method, gens)


def _deepseek_tensor(plan: Plan, step: Step, x: list[Tensor]) -> Tensor:
    from attnconv.convert.mla.deepseek import KV_NORM_EPS, TRANSFORMS, residual_scale

    return TRANSFORMS[step.key](x[0], residual_scale(plan.target.config.get("rms_norm_eps") or KV_NORM_EPS))


OPS: dict[str, Op] = {
    op.name: op
    for op in [
        Op("copy", "copied unchanged", lambda plan, step, x: x[0]),
        Op("transpose", "Conv1D -> Linear layout", lambda plan, step, x: x[0].t()),
        Op("kv_proj", "K/V heads merged", _kv_proj),
        Op("fused_qkv", "fused q|k|v: K/V heads merged", _fused_qkv),
        Op("gpt2_c_attn", "GPT-2 c_attn -> GPTBigCode c_attn", _gpt2_c_attn),
        Op("mla_layer", "the layer's attention as MLA (one computation per layer)",
           lambda plan, step, x: plan.layer_output(step, x)),
        Op("gqa_layer", "the layer's attention with K/V heads merged by a calibrated method (one computation per "
           "layer)", lambda plan, step, x: plan.layer_output(step, x)),
        Op("deepseek_tensor", "renamed, split or folded for DeepSeek-V3", _deepseek_tensor),
    ]
}

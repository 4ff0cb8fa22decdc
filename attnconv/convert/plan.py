"""A conversion as a plan of small steps (one per output tensor) that `--dry-run` prints and tests inspect.

The plan follows the source's layout (`layout.py`: config.json and shard headers only). Each converted
step's output shape is found by running its tensor function on meta tensors, so the plan knows the whole
output before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnconv.convert.families import Adapter, HeadLayout
from attnconv.convert.gqa import (
    METHODS,
    Method,
    convert_fused_qkv,
    convert_gpt2_c_attn,
    convert_kv_proj,
    tensor_generator,
)
from attnconv.convert.layout import Source, inspect_source
from attnconv.convert.tensor_io import CheckpointReader, torch_dtype
from attnconv.errors import AttnconvError
from attnconv.kv import DTYPE_BYTES


@dataclass(frozen=True)
class Step:
    """One output tensor: `op` applied to `inputs` (one input for GQA; MLA steps will take several)."""

    output: str
    inputs: tuple[str, ...]
    op: str  # copy | transpose | kv_proj | fused_qkv | gpt2_c_attn
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: str
    raw: bool = False  # copied as bytes, never decoded

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass
class Plan:
    source_spec: str
    source: Path
    adapter: Adapter
    layout_in: HeadLayout
    layout_out: HeadLayout
    method: Method
    seed: int
    out_dtype: torch.dtype | None
    reader: CheckpointReader
    config_out: dict
    files_to_copy: list[str]
    steps: list[Step] = field(default_factory=list)
    layout: Source | None = None

    def shards(self) -> dict[str, list[Step]]:
        out: dict[str, list[Step]] = {}
        for s in self.steps:
            out.setdefault(s.shard, []).append(s)
        return out

    def is_raw_copy(self, step: Step) -> bool:
        return step.raw

    @property
    def bytes_read(self) -> int:
        return sum(m.nbytes for m in self.reader.tensors.values())

    @property
    def bytes_written(self) -> int:
        return sum(s.nbytes for s in self.steps)

    def kv_bytes_per_token(self, which: str) -> int:
        """KV-cache bytes per token 'before' or 'after' the conversion, in the K projection's dtype."""
        layout = self.layout_in if which == "before" else self.layout_out
        dtype = self.out_dtype if which == "after" and self.out_dtype else None
        if dtype is None:
            k_name = next(s.inputs[0] for s in self.steps if s.op != "copy")
            dtype = self.reader.tensors[k_name].dtype
        return layout.layers * 2 * layout.n_kv_heads * layout.head_dim * DTYPE_BYTES.get(dtype, 4)

    def run_step(self, step: Step, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The tensor function of one step (works on meta tensors too)."""
        x, lay, n_out, m = inputs[0], self.layout_in, self.layout_out.n_kv_heads, self.method
        gen = (lambda part: tensor_generator(self.seed, f"{step.output}{part}")) if m.uses_seed else (lambda _: None)
        if step.op == "copy":
            y = x
        elif step.op == "transpose":
            y = x.t()
        elif step.op == "kv_proj":
            y = convert_kv_proj(x, lay, n_out, m, gen(""))
        elif step.op == "fused_qkv":
            y = convert_fused_qkv(x, lay, n_out, m, (gen(":k"), gen(":v")))
        elif step.op == "gpt2_c_attn":
            y = convert_gpt2_c_attn(x, lay, n_out, m, (gen(":k"), gen(":v")))
        else:
            raise ValueError(f"unknown op {step.op}")
        return y.to(step.dtype)


def plan_for(src: Source, method: str = "mean", seed: int = 0) -> Plan:
    """Every output tensor with its shape, dtype and shard, in the order of the source's layout."""
    if method not in METHODS:
        raise AttnconvError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    lay = src.layout_in
    plan = Plan(src.spec, src.path, src.adapter, lay, src.layout_out, METHODS[method], seed,
                getattr(torch, src.dtype) if src.dtype else None, src.reader, src.config_out, src.files_to_copy,
                layout=src)
    for shard, entries in src.shards.items():
        for e in entries:
            step = Step(e.output, (e.meta.name,), e.op, torch_dtype(e.out_dtype), e.meta.shape, shard, e.raw)
            if not e.raw:
                try:
                    shape = plan.run_step(step, [torch.empty(e.meta.shape, dtype=e.meta.dtype, device="meta")]).shape
                except (RuntimeError, ValueError):
                    raise AttnconvError(
                        f"{e.meta.name} has shape {list(e.meta.shape)}, which does not fit the config's "
                        f"{lay.n_heads} heads / {lay.n_kv_heads} KV heads of {lay.head_dim}"
                    ) from None
                step = Step(e.output, step.inputs, e.op, step.dtype, tuple(shape), shard)
            plan.steps.append(step)
    return plan


def make_plan(source: str | Path, kv_heads: int, method: str = "mean", seed: int = 0,
              dtype: torch.dtype | str | None = None, allow_pickle: bool = False) -> Plan:
    """Read config and headers, check the request, and lay out every output tensor."""
    return plan_for(inspect_source(source, kv_heads, dtype, allow_pickle), method, seed)

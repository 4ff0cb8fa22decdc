"""A conversion as a plan of small steps (one per output tensor) that `--dry-run` prints and tests inspect.

The plan follows the source's layout (`layout.py`: config.json and shard headers only). Each converted
step's output shape is found by running its tensor function on meta tensors, so the plan knows the whole
output before any work.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnconv.convert.gqa.methods import Method
from attnconv.convert.gqa.pool import tensor_generator
from attnconv.convert.layout import Source, inspect_source
from attnconv.convert.ops import OPS, Step
from attnconv.convert.settings import ConvertSettings
from attnconv.convert.target import Calibration, LayerTarget, layer_input_key
from attnconv.dtypes import dtype_bytes
from attnconv.errors import AttnconvError
from attnconv.families import Family
from attnconv.model_shape import HeadLayout
from attnconv.tensor_io import CheckpointReader, torch_dtype


@dataclass
class Plan:
    settings: ConvertSettings
    source: Path
    family: Family
    layout_in: HeadLayout
    layout_out: HeadLayout
    method: Method
    out_dtype: torch.dtype | None
    reader: CheckpointReader
    config_out: dict
    files_to_copy: list[str]
    steps: list[Step] = field(default_factory=list)
    layout: Source | None = None
    progress: bool = True
    _layers: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _calibration: object | None = field(default=None, repr=False)
    stop: threading.Event = field(default_factory=threading.Event, repr=False)  # set: the writer has stopped

    @property
    def target(self) -> LayerTarget | None:
        """What converts a layer at a time (convert/target.py), or None for GQA/MQA by mean/first/random (one
        tensor at a time)."""
        return self.layout.target if self.layout is not None else None

    def layer_inputs(self, layer: int) -> dict[str, torch.Tensor]:
        """A layer's attention tensors, named relative to its attention module."""
        step = next(s for s in self.steps if s.layer == layer)
        return {layer_input_key(n): self.reader.get(n) for n in step.inputs}

    def calibration(self):
        """The calibration run (started when first needed), or None when the settings need none."""
        if self._calibration is None and self.settings.needs_calibration:
            self._calibration = Calibration(self.target, self.source, self.layer_inputs, self.progress, self.stop)
        return self._calibration

    def step_inputs(self, step: Step) -> list[torch.Tensor]:
        """The tensors a step reads: none for a layer output whose layer is already converted."""
        if step.layer is not None and step.layer in self._layers:
            return []
        return [self.reader.get(n) for n in step.inputs]

    def layer_output(self, step: Step, inputs: list[torch.Tensor]) -> torch.Tensor:
        """One output of a layer's conversion: the first asked converts the layer; the others are kept until
        asked for (the executor asks in plan order, so a layer's outputs go out together)."""
        if step.layer not in self._layers:
            tensors = {layer_input_key(n): t for n, t in zip(step.inputs, inputs, strict=True)}
            calibration = self.calibration()
            stats = calibration.get(step.layer) if calibration is not None else None
            with torch.no_grad():
                self._layers[step.layer] = self.target.convert_layer(step.layer, tensors, stats)
        outputs = self._layers[step.layer]
        out = outputs.pop(step.key)
        if not outputs:
            del self._layers[step.layer]
        return out

    def shards(self) -> dict[str, list[Step]]:
        out: dict[str, list[Step]] = {}
        for s in self.steps:
            out.setdefault(s.shard, []).append(s)
        return out

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
            k_name = next(s.inputs[0] for s in self.steps if s.op not in ("copy", "deepseek_tensor"))
            dtype = self.reader.tensors[k_name].dtype
        if which == "after" and self.target is not None:
            keys = {layer_input_key(n) for s in self.steps if s.layer == 0 for n in s.inputs}
            if (values := self.target.cache_values_per_token(keys)) is not None:  # MLA: its latent and RoPE keys
                return values * dtype_bytes(dtype)
        return layout.layers * 2 * layout.n_kv_heads * layout.head_dim * dtype_bytes(dtype)

    def generator(self, step: Step, part: str) -> torch.Generator | None:
        """A generator per output tensor (and part), so seeded methods give the same heads in any order of work."""
        return tensor_generator(self.settings.seed, f"{step.output}{part}") if self.method.uses_seed else None

    def run_step(self, step: Step, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The tensor function of one step (works on meta tensors too)."""
        return OPS[step.op].run(self, step, inputs).to(step.dtype)


def plan_for(src: Source) -> Plan:
    """Every output tensor with its shape, dtype and shard, in the order of the source's layout."""
    settings, lay = src.settings, src.layout_in
    plan = Plan(settings, src.path, src.family, lay, src.layout_out, settings.merge_method,
                getattr(torch, src.dtype) if src.dtype else None, src.reader, src.config_out, src.files_to_copy,
                layout=src)
    for shard, entries in src.shards.items():
        for e in entries:
            step = Step(e.output, tuple(m.name for m in e.inputs), e.op, torch_dtype(e.out_dtype),
                        e.shape or e.meta.shape, shard, e.raw, e.layer, e.key)
            if not e.raw and e.shape is None:
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


def make_plan(settings: ConvertSettings) -> Plan:
    """Read config and headers, check the request, and lay out every output tensor."""
    return plan_for(inspect_source(settings))

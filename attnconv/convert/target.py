"""What converts a layer at a time, shared by the conversions that do (calibrated GQA, both MLA formats).

`LayerTarget` is the protocol the plan, the layout, the report and the calibration run speak to; layout.TARGETS
chooses one by the settings' target and format, so a new conversion is a class in its folder (gqa/, mla/) and an
entry there, not branches in the plan. A layer's tensors are named relative to its attention module
(`attention_key`); the layer's input RMSNorm, when a target folds it, under INPUT_NORM_KEY. `Calibration` runs the
source layer by layer as the plan reaches its layers and hands each layer's statistics to the target that asked
for them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from attnconv.convert.settings import ConvertSettings
from attnconv.textdata import CALIBRATION_SPEC

if TYPE_CHECKING:  # torch-free at import: the layout (no torch yet) chooses the target; its work imports torch
    from torch import Tensor

    from attnconv.convert.attention_weights import AttentionWeights

ATTENTION = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.self_attn\.)(?P<key>.+)$")
INPUT_NORM = re.compile(r"^.*\.layers\.(?P<layer>\d+)\.input_layernorm\.weight$")
INPUT_NORM_KEY = "input_layernorm.weight"  # a layer input's key beside its attention tensors (folded into them)


def attention_key(name: str) -> tuple[int, str, str] | None:
    """(layer, prefix, key) of a tensor inside a layer's attention module, else None."""
    m = ATTENTION.match(name)
    return (int(m.group("layer")), m.group("prefix"), m.group("key")) if m else None


def layer_input_key(name: str) -> str:
    """The key a layer's conversion reads a tensor under: relative to the attention module, or INPUT_NORM_KEY."""
    where = attention_key(name)
    return where[2] if where is not None else INPUT_NORM_KEY


class LayerTarget(Protocol):
    """A conversion computed one layer at a time: its output layout, each layer's conversion, its calibration."""

    settings: ConvertSettings
    config: dict  # the source's config.json
    notes: list[str]
    op: str  # the convert op (ops.py) of every output of a layer

    def layer_outputs(self, layer: int, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]: ...

    def other_outputs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], str]]: ...

    def extra_layer_input(self, name: str) -> tuple[int, str] | None:
        """(layer, key) of a tensor outside attention that a layer's conversion also reads, else None."""

    def check_dtype(self, dtype: str | None) -> None:
        """Refuse (AttnconvError) an output dtype ('float16', ...; None: not known) the output cannot hold."""

    def planned_config(self, layout_config: dict) -> dict:
        """The output's config.json as the plan knows it before any layer is converted (layout_config: the
        source's with the output's KV heads)."""

    def cache_values_per_token(self, keys: set[str]) -> int | None:
        """KV-cache values per token of the output, all layers (keys: layer 0's input keys); None: the output
        layout's K/V heads say it."""

    def describe(self, kv_before: int) -> str:
        """The conversion in one line (the plan's header)."""

    def weights(self, tensors: dict[str, Tensor]) -> AttentionWeights: ...

    def convert_layer(self, layer: int, tensors: dict[str, Tensor], stats: Any) -> dict[str, Tensor]: ...

    def collectors(self, weights: AttentionWeights, inv_freq: Tensor, attention=None, rotary=None) -> list: ...

    def statistics(self, collectors: list) -> Any: ...

    def collector_bytes(self, seq_len: int) -> int: ...

    def record(self) -> dict[str, Any]: ...

    def conversion_record(self, common: dict[str, Any], calibration: Calibration | None) -> dict[str, Any]:
        """attnconv.json's "conversion": what the target chose, with the fields every conversion records."""

    def finished_config(self, planned: dict, out_dtype: str | None) -> dict:
        """config.json once every layer is converted (planned: the plan's; out_dtype: --dtype, None: the source's)."""


class Calibration:
    """Layer statistics on demand: the source runs layer by layer as the plan reaches its layers (in order)."""

    def __init__(self, target: LayerTarget, source: Path, read_layer, progress: bool, stop=None):
        from attnconv.calibration import LayerwiseModel, calibration_tokens, run_layers
        from attnconv.loading import load_tokenizer

        s = target.settings
        seq_len = s.calibration_seq_len(target.config)
        tokens = calibration_tokens(s.calibrate, load_tokenizer(source), s.calib_tokens, seq_len)
        model = LayerwiseModel(source, allow_pickle=s.allow_pickle)
        inv_freq = model.inv_freq
        self.target, self.tokens = target, tokens

        def make(layer: int) -> list:
            return target.collectors(target.weights(read_layer(layer)), inv_freq, model.layers[layer].self_attn,
                                     model.base.rotary_emb)

        self._layers = run_layers(model, tokens, make, progress=progress, stop=stop)
        self._ready: dict[int, Any] = {}  # statistics of layers computed ahead of their conversion

    def get(self, layer: int):
        """Layer's statistics (the source is run up to it; earlier layers not yet asked for are kept)."""
        while layer not in self._ready:
            try:
                index, collectors = next(self._layers)
            except StopIteration:
                raise RuntimeError(f"calibration ended before layer {layer}") from None
            from attnconv import finite

            self._ready[index] = finite.statistics(self.target.statistics(collectors), index)
        return self._ready.pop(layer)

    def record(self) -> dict[str, Any]:
        s = self.target.settings
        return {"data": s.calibrate or CALIBRATION_SPEC, "tokens": int(self.tokens.numel()),
                "seq_len": int(self.tokens.shape[1])}

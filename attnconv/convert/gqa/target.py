"""`convert --to gqa|mqa --method grouped|aligned|fit` streamed: each layer's attention converted as a whole.

The calibrated methods (gqa/calibrated.py) permute, rotate and refit the query, key, value and output projections
of a layer together, so unlike mean/first/random (one tensor at a time, gqa/pool.py) every tensor of a layer's
attention module is one computation's output: q_proj / o_proj keep their shapes (rows and columns permuted and
compensated), k_proj / v_proj get n_out heads, Phi-3's fused qkv_proj is split and recombined, q/k norms and
anything else in the module are copied. The plan drives it as it does MLA (mla/target.py): the first output of a
layer takes that layer's calibration statistics (S and the attended moment A of its attention input, computed
by running the source layer by layer) and converts it; only one layer's statistics are alive at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnconv.convert.attention_weights import AttentionShape, AttentionWeights, from_tensors, fused_qkv_key, shape_of
from attnconv.convert.gqa.calibrated import convert_layer
from attnconv.convert.gqa.calibration import AttendedMomentCollector
from attnconv.convert.gqa.methods import Method
from attnconv.convert.settings import ConvertSettings
from attnconv.errors import AttnconvError
from attnconv.families import ROPE_FAMILIES


@dataclass
class GqaTarget:
    """A calibrated GQA/MQA conversion of one source: its per-layer outputs, and each layer's conversion."""

    settings: ConvertSettings
    config: dict  # the source's config.json
    shape: AttentionShape
    n_out: int
    method: Method
    records: dict[int, dict] = field(default_factory=dict)  # per layer: what convert_layer chose
    notes: list[str] = field(default_factory=list)
    op = "gqa_layer"  # the convert op (ops.py) of every output of a layer

    @classmethod
    def create(cls, settings: ConvertSettings, config: dict, family: str) -> GqaTarget:
        info = settings.merge_method
        if family not in ROPE_FAMILIES:
            raise AttnconvError(f"--method {info.name} needs a RoPE attention family ({', '.join(ROPE_FAMILIES)}); "
                                f"{family} has learned positions and a fused Conv1D c_attn: use --method mean, "
                                "first or random")
        shape = shape_of(config)
        if shape.rotary_dim != shape.head_dim and {"aligned", "fit"} & set(info.steps):
            raise AttnconvError(f"--method {info.name} maps each key head's RoPE pairs, which needs RoPE on the whole "
                                f"head; this model rotates {shape.rotary_dim} of {shape.head_dim} dims (partial "
                                "rotary): use --method grouped or mean")
        return cls(settings, config, shape, settings.target_kv_heads, info)

    @property
    def steps(self) -> tuple[str, ...]:
        return self.method.steps

    # --- layout ---
    def layer_outputs(self, layer: int, inputs: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Output names (relative to the attention module) and shapes of one layer: the inputs', K/V reduced."""
        d, hidden, kv_rows = self.shape.head_dim, self.shape.hidden, self.n_out * self.shape.head_dim
        out = dict(inputs)
        for key in ("k_proj.weight", "v_proj.weight"):
            if key in out:
                out[key] = (kv_rows, hidden)
        for key in ("k_proj.bias", "v_proj.bias"):
            if key in out:
                out[key] = (kv_rows,)
        if fused := fused_qkv_key(out):
            out[fused] = ((self.shape.n_heads + 2 * self.n_out) * d, hidden)
        return out

    def other_outputs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], str]]:
        return [(name, shape, "copy")]

    def extra_layer_input(self, name: str) -> tuple[int, str] | None:
        return None  # a layer reads only its attention tensors

    def check_dtype(self, dtype: str | None) -> None:
        """Every dtype holds a GQA model."""

    def planned_config(self, layout_config: dict) -> dict:
        return layout_config  # the source's, with n_out KV heads

    def cache_values_per_token(self, keys: set[str]) -> int | None:
        return None  # K and V of n_out heads: the output layout's heads say it

    def describe(self, kv_before: int) -> str:
        return f"KV heads {kv_before} -> {self.n_out} ({self.method.name}, calibrated)"

    # --- computation ---
    def weights(self, tensors: dict[str, Tensor]) -> AttentionWeights:
        return from_tensors(tensors, self.shape, float(self.config.get("rms_norm_eps") or 1e-6))

    def convert_layer(self, layer: int, tensors: dict[str, Tensor], stats: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        """One layer's output tensors (names relative to its attention module), from its source tensors."""
        second, attended = stats
        new, record = convert_layer(self.weights(tensors), second, self.n_out, self.method, attended_moment=attended,
                                    seed=self.settings.seed)
        self.records[layer] = summary(record)
        out = dict(tensors)  # norms, o_proj.bias and anything else: unchanged
        if fused := fused_qkv_key(tensors):
            out[fused] = torch.cat([new.q, new.k, new.v])
        else:
            for p in "qkv":
                out[f"{p}_proj.weight"] = getattr(new, p)
                if f"{p}_proj.bias" in tensors:
                    out[f"{p}_proj.bias"] = getattr(new, f"{p}_bias")
        out["o_proj.weight"] = new.o
        return out

    def collectors(self, weights: AttentionWeights, inv_freq: Tensor, attention=None, rotary=None) -> list:
        """S and A of one layer's attention input; attention/rotary: the source's modules (meta weights), which
        say the layer's logit scale, sliding window and RoPE scaling as transformers applies them."""
        window = getattr(attention, "sliding_window", None) if attention is not None else None
        if attention is not None and not hasattr(attention, "sliding_window"):  # Mistral, Phi-3: the config's
            window = self.config.get("sliding_window")
        return [AttendedMomentCollector(
            weights, inv_freq, rope_scale=float(getattr(rotary, "attention_scaling", 1.0)),
            scaling=getattr(attention, "scaling", None), norm_eps=weights.norm_eps, sliding_window=window)]

    @staticmethod
    def statistics(collectors: list) -> tuple[Tensor, Tensor]:
        return collectors[0].result()

    def collector_bytes(self, seq_len: int) -> int:
        """One layer's statistics (three float64 (hidden + 1)^2 sums) and the attention recomputed per sequence:
        q and k of one sequence plus a chunk of scores (AttendedMomentCollector.max_scores)."""
        s = self.shape
        sums = 3 * 8 * (s.hidden + 1) ** 2
        heads = seq_len * (s.n_heads * 2 + s.n_kv_heads) * s.head_dim * 4
        return sums + heads + min(s.n_heads * seq_len * seq_len, 1 << 24) * 4 * 2

    def record(self) -> dict[str, Any]:
        """What provenance says: the method, its steps, and per layer what it chose."""
        return {"method": self.method.name, "steps": list(self.steps), "seed": self.settings.seed,
                "key_value_metric": "attended", "layers": {i: r for i, r in sorted(self.records.items())}}

    def conversion_record(self, common: dict[str, Any], calibration) -> dict[str, Any]:
        record = self.record()
        return {"to": "mqa" if self.n_out == 1 else "gqa", "method": record.pop("method"), "seed": record.pop("seed"),
                "kv_heads_after": self.n_out, **common, **record, "calibration": calibration.record()}

    def finished_config(self, planned: dict, out_dtype: str | None) -> dict:
        return planned  # every choice a layer makes lives in its tensors


def summary(record: dict) -> dict:
    """A per-layer record of convert_layer, with its per-pair lists reduced to per-head summaries (a 7B layer's
    angles alone are 2k numbers): groups, the grouping search and the objectives stay whole."""
    out = {k: v for k, v in record.items() if k not in ("alignment", "fit")}
    if "alignment" in record:
        a = record["alignment"]
        out["alignment"] = {
            "rotatable_pairs": a["rotatable_pairs"],
            "key_angle_abs_mean": [round(sum(map(abs, h)) / len(h), 6) for h in a["key_angles"]],
            "value_maps": a["value_maps"], "objective_after": a["objective_after"]}
    if "fit" in record:
        f = record["fit"]
        factors = [x for head in f["key_factor_abs"] for x in head]
        out["fit"] = {"key_compensation": f["key_compensation"],
                      "key_factor_abs": {"min": min(factors), "mean": sum(factors) / len(factors),
                                         "max": max(factors)}}
    return out

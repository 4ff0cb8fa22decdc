"""`convert --to mla` streamed: what each layer's attention becomes, computed one layer at a time.

The plan asks an MLA target which tensors each layer's attention writes (names and shapes, known before anything
is computed) and what every other tensor becomes; executing the plan, the first output of a layer reads that
layer's attention tensors, takes its calibration statistics (when the settings need any) and converts the layer;
its other outputs come from the same result. Calibration runs the source layer by layer (attnconv/calibration/)
as the layers are reached, so a layer's statistics exist only until it is converted: memory is one layer's
working set, the calibration tokens' hidden states and one layer's statistics.

`MlaTarget` is what both output formats share (the latent ranks, the RoPE dims, the --kv-heads merge, the
calibration statistics); each format is a subclass that says its layout and converts a layer's latent:
DeepSeekV3Target (mla/deepseek_target.py) and AttnconvMlaTarget (mla/attnconv_target.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from attnconv.convert.attention_weights import AttentionShape, AttentionWeights, from_tensors, shape_of
from attnconv.convert.gqa.calibrated import convert_layer as merge_layer
from attnconv.convert.gqa.target import GqaTarget
from attnconv.convert.mla.calibration import AttentionPhaseCollector, MomentCollector, PairNormCollector
from attnconv.convert.mla.inmemory import LayerStatistics
from attnconv.convert.mla.lowrank import check_rank
from attnconv.convert.mla.rope import check_rope_dim, pair_scores
from attnconv.convert.settings import ConvertSettings
from attnconv.errors import AttnconvError


@dataclass
class MlaTarget(ABC):
    """The MLA conversion of one source, in either format: its output layout, and each layer's conversion."""

    settings: ConvertSettings
    config: dict  # the source's config.json
    shape: AttentionShape
    rope_dim: int
    kv_ranks: list[int]
    notes: list[str] = field(default_factory=list)
    merge: GqaTarget | None = None  # --kv-heads: the KV heads merge first by this GQA conversion (mean or calibrated)
    source_shape: AttentionShape | None = None  # the source's heads, when merged (shape is then the merged GQA's)
    q_rank: int | None = None  # the query latent (deepseek-v3 --q-rank); None: the query is full rank
    op = "mla_layer"  # the convert op (ops.py) of every output of a layer

    @classmethod
    def create(cls, settings: ConvertSettings, config: dict) -> MlaTarget:
        shape = shape_of(config)
        layers = config["num_hidden_layers"]
        rope_dim = settings.rope_dim or max(2, cls.default_rope_dim(shape))
        check_rope_dim(rope_dim, shape)
        ranks = list(settings.kv_rank)
        if len(ranks) not in (1, layers):
            raise AttnconvError(f"--kv-rank gives {len(ranks)} ranks for {layers} layers; give one, or one per layer")
        target = cls(settings, config, shape, rope_dim, ranks * layers if len(ranks) == 1 else ranks)
        if settings.kv_heads is not None:
            n = settings.kv_heads
            if shape.n_kv_heads % n or n > shape.n_kv_heads:
                raise AttnconvError(f"--kv-heads {n} must divide the source's {shape.n_kv_heads} KV heads")
            if shape.rotary_dim != shape.head_dim:
                raise AttnconvError("--kv-heads with --to mla maps each key head's RoPE pairs, which needs RoPE on "
                                    "the whole head (this model is partial rotary); leave --kv-heads out")
            target.merge = GqaTarget(settings, config, shape, n, settings.merge_method)
            target.source_shape, target.shape = shape, replace(shape, n_kv_heads=n)
            target.notes.append(f"KV heads merged {shape.n_kv_heads} -> {n} by {settings.method} before the latent "
                                "(phases not used: they are the source heads' rotations)")
        target.prepare()
        for rank in sorted(set(target.kv_ranks)):  # before calibration, not when the layer is reached
            check_rank(rank, target.max_kv_rank())
        return target

    # --- what each format says (the subclasses) ---
    @staticmethod
    @abstractmethod
    def default_rope_dim(shape: AttentionShape) -> int:
        """--rope-dim when not given."""

    def prepare(self) -> None:
        """The format's own checks and defaults, once the shared ones have passed."""
        return None  # none unless the format has some

    @abstractmethod
    def max_kv_rank(self) -> int:
        """The largest --kv-rank of a layer: the rank at which the format's latent is lossless."""

    @abstractmethod
    def layer_outputs(self, layer: int, keys: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Output tensor names (relative to the layer's attention module) and shapes of one layer."""

    @abstractmethod
    def other_outputs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], str]]:
        """What a tensor outside attention becomes: [(name, shape, transform)]."""

    def extra_layer_input(self, name: str) -> tuple[int, str] | None:
        """(layer, key) of a tensor outside attention that a layer's conversion also reads."""
        return None

    def check_dtype(self, dtype: str | None) -> None:
        """Refuse an output dtype ('float16', ...; None: not known) that the format cannot hold."""
        return None  # every dtype, unless the format says otherwise

    @abstractmethod
    def config_out(self) -> dict:
        """The output's config.json (without its dtype)."""

    @abstractmethod
    def planned_config(self, layout_config: dict) -> dict:
        """The config.json the plan shows before any layer is converted ({}: known only once they are)."""

    @abstractmethod
    def format_record(self) -> dict[str, Any]:
        """What provenance says of the format beyond the shared record."""

    @abstractmethod
    def cache_values_per_token(self, keys: set[str]) -> int:
        """Cached values per token, all layers (keys: a layer's input keys, relative to its attention module)."""

    @abstractmethod
    def rope_description(self) -> str:
        """Where the RoPE dims go, in words (the plan's header)."""

    @abstractmethod
    def convert_latent(self, layer: int, w: AttentionWeights, tensors: dict[str, Tensor],
                       stats: LayerStatistics | None, moments, phases) -> dict[str, Tensor]:
        """One layer's output tensors from its (merged) weights: the latent and the RoPE key in this format."""

    # --- shared ---
    def describe(self, kv_before: int) -> str:
        """The conversion in one line (the plan's header)."""
        s = self.settings
        ranks = sorted(set(self.kv_ranks))
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        how = s.init + (", phases" if s.phases and self.merge is None else "")
        merged = f" -> {s.kv_heads} ({s.method})" if self.merge is not None else ""
        return f"{kv_before} KV heads{merged} -> MLA {s.format} (latent {rank} + {self.rope_description()}; {how})"

    def record(self) -> dict[str, Any]:
        """What provenance says of the MLA conversion (ranks, RoPE dims, notes, and the format's own)."""
        s = self.settings
        out = {"format": s.format, "kv_rank": self.kv_ranks, "rope_dim": self.rope_dim, "init": s.init,
               "rope_select": s.rope_select, "phases": s.phases, "q_rank": self.q_rank, "notes": self.notes}
        if self.merge is not None:
            out.update(kv_heads=self.shape.n_kv_heads, method=s.method, phases=False,
                       key_value_metric="attended" if self.attended_merge else "input")
        return out | self.format_record()

    def conversion_record(self, common: dict[str, Any], calibration) -> dict[str, Any]:
        return {"to": "mla", **self.record(), **common,
                "calibration": calibration.record() if calibration is not None else None}

    def finished_config(self, planned: dict, out_dtype: str | None) -> dict:
        """What the layers chose (attnconv format: their RoPE pairs), in the output's dtype."""
        config = self.config_out()
        if out_dtype is not None:
            config["dtype"] = out_dtype
            config.pop("torch_dtype", None)
        return config

    def weights(self, tensors: dict[str, Tensor]) -> AttentionWeights:
        return from_tensors(tensors, self.source_shape or self.shape, float(self.config.get("rms_norm_eps") or 1e-6))

    def convert_layer(self, layer: int, tensors: dict[str, Tensor], stats: LayerStatistics | None) -> dict[str, Tensor]:
        """One layer's output tensors (names relative to its attention module), from its source tensors."""
        s, w = self.settings, self.weights(tensors)
        moments = stats.moments if stats is not None and s.init == "pca" else None
        phases = stats.phases if stats is not None and s.phases and self.merge is None else None
        if self.merge is not None:  # the calibrated (or mean) GQA first; the latent compresses it
            second = stats.moments.augmented() if stats is not None else None
            w = merge_layer(w, second, self.shape.n_kv_heads, self.merge.method,
                            attended_moment=stats and stats.attended, seed=s.seed)[0]
            stats = None  # the pair scores are the source heads': high/low/uniform only (settings check)
        return self.convert_latent(layer, w, tensors, stats, moments, phases)

    @property
    def attended_merge(self) -> bool:
        """Whether the --kv-heads merge weighs keys by the attention they get (its own metric, as --to gqa merges).
        Not before a shared RoPE key, whose latent compresses a merge by the input metric better (reference model,
        GQA-2 then 32 + 32 at MQA's bytes: KL 0.419 vs 0.512, and 0.106 vs 0.113 after the same uptraining)."""
        return self.merge is not None and self.merge.method.calibrated and self.settings.rope_key != "shared"

    def collectors(self, weights: AttentionWeights, inv_freq: Tensor, attention=None, rotary=None) -> list:
        """The input moments; the q/k pair norms only for --rope-select 2-norm (they recompute q and k, ~10% of
        a calibrated conversion); the merge's attended moment, or the attention's phases when nothing merges."""
        out: list = [MomentCollector(self.shape.hidden)]
        if self.settings.rope_select == "2-norm":
            out.append(PairNormCollector(weights))
        if self.attended_merge:  # its attended moment, as the merge collects it
            out += self.merge.collectors(weights, inv_freq, attention, rotary)
        elif self.merge is None and self.settings.phases:  # merged heads have no phases of their own
            out.append(AttentionPhaseCollector(weights, inv_freq))
        return out

    def collector_bytes(self, seq_len: int) -> int:
        """One layer's statistics: the input moments and the pair norms, float64 (with an attended --kv-heads
        merge, its attended moment and recomputed attention too)."""
        own = 2 * 8 * (self.shape.hidden + 1) ** 2
        return own + self.merge.collector_bytes(seq_len) if self.attended_merge else own

    @staticmethod
    def statistics(collectors: list) -> LayerStatistics:
        moments, rest = collectors[0].result(), collectors[1:]  # as `collectors` made them
        pairs = next((c for c in rest if isinstance(c, PairNormCollector)), None)
        extra = next((c.result() for c in rest if c is not pairs), None)  # the merge's or the phases
        attended = extra[1] if isinstance(extra, tuple) else None  # AttendedMomentCollector: (S, A)
        scores = pair_scores(*pairs.result(), pairs.w.shape) if pairs is not None else None
        return LayerStatistics(moments, scores, None if attended is not None else extra, attended)

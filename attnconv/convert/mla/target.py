"""`convert --to mla` streamed: what each layer's attention becomes, computed one layer at a time.

The plan asks an MlaTarget which tensors each layer's attention writes (names and shapes, known before anything
is computed) and what every other tensor becomes; executing the plan, the first output of a layer reads that
layer's attention tensors, takes its calibration statistics (when the settings need any) and converts the layer
(mla/attnconv_format.py / mla/deepseek.py); its other outputs come from the same result. Calibration runs the source
layer by layer (attnconv/calibration/) as the layers are reached, so a layer's statistics exist only until it is
converted: memory is one layer's working set, the calibration tokens' hidden states and one layer's statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from attnconv.convert.attention_weights import AttentionShape, AttentionWeights, from_tensors, shape_of
from attnconv.convert.gqa.calibrated import convert_layer as merge_layer
from attnconv.convert.gqa.methods import Method
from attnconv.convert.mla.attnconv_format import attnconv_config, attnconv_output_shapes, convert_attnconv_layer
from attnconv.convert.mla.calibration import AttentionPhaseCollector, MomentCollector, PairNormCollector
from attnconv.convert.mla.deepseek import (
    applied_norm,
    convert_deepseek_layer,
    deepseek_config,
    deepseek_output_shapes,
    deepseek_rules,
    folds_input_norm,
)
from attnconv.convert.mla.inmemory import LayerStatistics
from attnconv.convert.mla.rope import check_rope_dim, pair_scores, select_pairs
from attnconv.convert.settings import ConvertSettings
from attnconv.convert.target import INPUT_NORM, INPUT_NORM_KEY
from attnconv.engines import engine, engines_loading
from attnconv.errors import AttnconvError


@dataclass
class MlaTarget:
    """The MLA conversion of one source: its output layout, and each layer's conversion on demand."""

    settings: ConvertSettings
    config: dict  # the source's config.json
    shape: AttentionShape
    rope_dim: int
    kv_ranks: list[int]
    notes: list[str] = field(default_factory=list)
    pairs: dict[int, Tensor] = field(default_factory=dict)  # attnconv format: kept pairs per layer, as converted
    merge: Method | None = None  # --kv-heads: the KV heads merge first by this GQA method (mean or calibrated)
    source_shape: AttentionShape | None = None  # the source's heads, when merged (shape is then the merged GQA's)
    q_rank: int | None = None  # deepseek-v3: --q-rank, or the engine's default
    fold_norm: bool = False  # deepseek-v3: the input RMSNorms are folded into attention (exact query latent)
    op = "mla_layer"  # the convert op (ops.py) of every output of a layer

    @classmethod
    def create(cls, settings: ConvertSettings, config: dict) -> MlaTarget:
        shape = shape_of(config)
        layers = config["num_hidden_layers"]
        default = min(64, shape.rotary_dim) if settings.format == "deepseek-v3" else 2 * (shape.rotary_dim // 4)
        rope_dim = settings.rope_dim or max(2, default)
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
            target.merge = settings.merge_method
            target.source_shape, target.shape = shape, replace(shape, n_kv_heads=n)
            target.notes.append(f"KV heads merged {shape.n_kv_heads} -> {n} by {settings.method} before the latent "
                                "(phases not used: they are the source heads' rotations)")
        if settings.format == "deepseek-v3":
            if settings.rope_select not in ("high", "uniform"):
                raise AttnconvError(f"--rope-select {settings.rope_select} keeps pairs whose frequencies DeepSeek's "
                                    "one geometric series cannot give; use high or uniform, or --format attnconv")
            eng = engine(settings.engine)
            if (problem := eng.setting_problem(ranks[0], rope_dim, shape.head_dim)) is not None:
                raise AttnconvError(problem)
            target.q_rank = settings.q_rank or eng.default_q_rank(shape.hidden, layers)
            if target.q_rank is not None and target.q_rank > shape.hidden:
                raise AttnconvError(f"--q-rank {target.q_rank} exceeds the hidden size {shape.hidden}, which is "
                                    f"already exact; choose at most {shape.hidden}")
            if (problem := eng.q_rank_problem(target.q_rank, layers)) is not None:
                raise AttnconvError(problem)
            target.fold_norm = folds_input_norm(target.q_rank, shape.hidden)
            out, target.notes = deepseek_config(config, shape, kv_rank=ranks[0], rope_dim=rope_dim,
                                                rope_select=settings.rope_select, q_rank=target.q_rank)
            if problems := eng.config_problems(out):  # what the source brings that the engine cannot run
                raise AttnconvError(f"--engine {eng.name} cannot serve this model: {problems[0]}")
        return target

    # --- layout ---
    def layer_outputs(self, layer: int, keys: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Output tensor names (relative to the layer's attention module) and shapes of one layer."""
        s, rank = self.settings, self.kv_ranks[layer]
        if s.format == "deepseek-v3":
            return deepseek_output_shapes(self.shape, kv_rank=rank, rope_dim=self.rope_dim, q_rank=self.q_rank)
        return attnconv_output_shapes(self.shape, kv_rank=rank, rope_dim=self.rope_dim,
                                      q_bias="q_proj.bias" in keys, kv_bias="k_proj.bias" in keys,
                                      o_bias="o_proj.bias" in keys, qk_norm="k_norm.weight" in keys)

    def other_outputs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], str]]:
        """What a tensor outside attention becomes: [(name, shape, transform)] (transforms: mla_deepseek)."""
        if self.settings.format == "attnconv":
            return [(name, shape, "copy")]
        return deepseek_rules(name, shape, family=self.config["model_type"],
                              tied=bool(self.config.get("tie_word_embeddings")), fold_norm=self.fold_norm)

    def extra_layer_input(self, name: str) -> tuple[int, str] | None:
        """(layer, key) of a tensor outside attention that a layer's conversion also reads: the input RMSNorm
        weight when it is folded into the attention projections."""
        m = INPUT_NORM.match(name) if self.fold_norm else None
        return (int(m.group("layer")), INPUT_NORM_KEY) if m else None

    def config_out(self) -> dict:
        s = self.settings
        if s.format == "deepseek-v3":
            return deepseek_config(self.config, self.shape, kv_rank=self.kv_ranks[0], rope_dim=self.rope_dim,
                                   rope_select=s.rope_select, q_rank=self.q_rank)[0]
        # a layer's pairs as converted; a layer not converted (dry run) gets the selection that needs no data
        pairs = [self.pairs[i] if i in self.pairs else self._pairs(None) for i in range(len(self.kv_ranks))]
        config = dict(self.config, num_key_value_heads=self.shape.n_kv_heads)
        return attnconv_config(config, kv_ranks=self.kv_ranks, rope_dim=self.rope_dim, pairs=pairs, init=s.init)

    def record(self) -> dict[str, Any]:
        """What provenance says of the MLA conversion (ranks, RoPE dims, the pairs each layer kept, notes)."""
        out = {"format": self.settings.format, "kv_rank": self.kv_ranks, "rope_dim": self.rope_dim,
               "init": self.settings.init, "rope_select": self.settings.rope_select, "phases": self.settings.phases,
               "q_rank": self.q_rank, "notes": self.notes}
        if self.merge is not None:
            out.update(kv_heads=self.shape.n_kv_heads, method=self.settings.method, phases=False)
        if self.settings.format == "deepseek-v3":  # the engine asked for, and every engine that loads the output
            out.update(engine=self.settings.engine, engines=engines_loading(self.config_out()),
                       input_norm_folded=self.fold_norm)
        if self.pairs:
            out["rope_pairs"] = {i: p.tolist() for i, p in sorted(self.pairs.items())}
        return out

    # --- computation ---
    def _pairs(self, stats: LayerStatistics | None) -> Tensor:
        n_keep = self.rope_dim // 2
        return select_pairs(self.settings.rope_select, self.shape, n_keep, stats.pair_scores if stats else None)

    def weights(self, tensors: dict[str, Tensor]) -> AttentionWeights:
        return from_tensors(tensors, self.source_shape or self.shape, float(self.config.get("rms_norm_eps") or 1e-6))

    def convert_layer(self, layer: int, tensors: dict[str, Tensor], stats: LayerStatistics | None) -> dict[str, Tensor]:
        """One layer's output tensors (names relative to its attention module), from its source tensors."""
        s, w = self.settings, self.weights(tensors)
        moments = stats.moments if stats is not None and s.init == "pca" else None
        phases = stats.phases if stats is not None and s.phases and self.merge is None else None
        if self.merge is not None:  # the calibrated (or mean) GQA first; the latent compresses it
            second = stats.moments.augmented() if stats is not None else None
            w = merge_layer(w, second, self.shape.n_kv_heads, self.merge, attended_moment=stats and stats.attended,
                            seed=s.seed)[0]
            stats = None  # the pair scores are the source heads': high/low/uniform only (settings check)
        if s.format == "deepseek-v3":
            norm = tensors.get(INPUT_NORM_KEY)
            norm = applied_norm(norm, self.config["model_type"]) if norm is not None else None
            return convert_deepseek_layer(w, kv_rank=self.kv_ranks[layer], rope_dim=self.rope_dim, init=s.init,
                                          moments=moments, rope_select=s.rope_select, q_rank=self.q_rank,
                                          phases=phases, input_norm=norm)
        self.pairs[layer] = self._pairs(stats)
        return convert_attnconv_layer(w, kv_rank=self.kv_ranks[layer], pairs=self.pairs[layer], init=s.init,
                                      moments=moments, phases=phases)

    def collectors(self, weights: AttentionWeights, inv_freq: Tensor, attention=None, rotary=None) -> list:
        s = self.settings
        out: list = [MomentCollector(self.shape.hidden), PairNormCollector(weights)]
        if self.merge is not None and self.merge.calibrated:  # its attended moment, as gqa/target.py collects it
            from attnconv.convert.gqa.target import GqaTarget

            out += GqaTarget(s, self.config, self.source_shape, self.shape.n_kv_heads, self.merge).collectors(
                weights, inv_freq, attention, rotary)
        elif s.phases:
            out.append(AttentionPhaseCollector(weights, inv_freq))
        return out

    def collector_bytes(self, seq_len: int) -> int:
        """One layer's statistics: the input moments and the pair norms, float64 (with --kv-heads, the merge's
        attended moment and recomputed attention too)."""
        own = 2 * 8 * (self.shape.hidden + 1) ** 2
        if self.merge is None or not self.merge.calibrated:
            return own
        from attnconv.convert.gqa.target import GqaTarget

        gqa = GqaTarget(self.settings, self.config, self.source_shape, self.shape.n_kv_heads, self.merge)
        return own + gqa.collector_bytes(seq_len)

    @staticmethod
    def statistics(collectors: list) -> LayerStatistics:
        moments, pairs = collectors[0].result(), collectors[1].result()
        extra = collectors[2].result() if len(collectors) > 2 else None
        attended = extra[1] if isinstance(extra, tuple) else None  # AttendedMomentCollector: (S, A)
        return LayerStatistics(moments, pair_scores(*pairs, collectors[1].w.shape),
                               None if attended is not None else extra, attended)

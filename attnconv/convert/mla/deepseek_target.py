"""`convert --to mla --format deepseek-v3` streamed: a layer's attention as a native DeepseekV3 layer.

One RoPE key of rope_dim shared by all heads and an optional query latent (--q-rank), checked against the
--engine the output is for before any work; the tensors outside attention follow deepseek_rules (the residual
stream rescaled for kv_a_layernorm's eps, Gemma's norms and embeddings, Phi-3's fused MLP split). The layer
functions are in mla/deepseek.py; what both formats share in mla/target.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from attnconv.convert.attention_weights import AttentionShape, AttentionWeights
from attnconv.convert.mla.deepseek import (
    applied_norm,
    convert_deepseek_layer,
    deepseek_config,
    deepseek_output_shapes,
    deepseek_rules,
    folds_input_norm,
)
from attnconv.convert.mla.inmemory import LayerStatistics
from attnconv.convert.mla.shared_key import max_kv_rank
from attnconv.convert.mla.target import MlaTarget
from attnconv.convert.target import INPUT_NORM, INPUT_NORM_KEY
from attnconv.engines import engine, engines_loading
from attnconv.errors import AttnconvError


@dataclass
class DeepSeekV3Target(MlaTarget):
    """MLA in DeepSeek-V3's format: a checkpoint transformers and the DeepSeek engines load natively."""

    fold_norm: bool = False  # the input RMSNorms are folded into attention (exact query latent)

    @staticmethod
    def default_rope_dim(shape: AttentionShape) -> int:
        return min(64, shape.rotary_dim)

    def max_kv_rank(self) -> int:
        return max_kv_rank(self.shape, self.rope_dim)

    def prepare(self) -> None:
        s, shape, layers = self.settings, self.shape, len(self.kv_ranks)
        if s.rope_select not in ("high", "uniform"):
            raise AttnconvError(f"--rope-select {s.rope_select} keeps pairs whose frequencies DeepSeek's one "
                                "geometric series cannot give; use high or uniform, or --format attnconv")
        eng = engine(s.engine)
        if (problem := eng.setting_problem(self.kv_ranks[0], self.rope_dim, shape.head_dim)) is not None:
            raise AttnconvError(problem)
        self.q_rank = s.q_rank or eng.default_q_rank(shape.hidden, layers)
        if self.q_rank is not None and self.q_rank > shape.hidden:
            raise AttnconvError(f"--q-rank {self.q_rank} exceeds the hidden size {shape.hidden}, which is already "
                                f"exact; choose at most {shape.hidden}")
        if (problem := eng.q_rank_problem(self.q_rank, layers)) is not None:
            raise AttnconvError(problem)
        self.fold_norm = folds_input_norm(self.q_rank, shape.hidden)
        out, notes = self._config()
        self.notes += notes
        if problems := eng.config_problems(out):  # what the source brings that the engine cannot run
            raise AttnconvError(f"--engine {eng.name} cannot serve this model: {problems[0]}")

    def _config(self) -> tuple[dict, list[str]]:
        return deepseek_config(self.config, self.shape, kv_rank=self.kv_ranks[0], rope_dim=self.rope_dim,
                               rope_select=self.settings.rope_select, q_rank=self.q_rank)

    # --- layout ---
    def layer_outputs(self, layer: int, keys: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        return deepseek_output_shapes(self.shape, kv_rank=self.kv_ranks[layer], rope_dim=self.rope_dim,
                                      q_rank=self.q_rank)

    def other_outputs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], str]]:
        """Transforms: mla/deepseek.py's TRANSFORMS (the op deepseek_tensor)."""
        return deepseek_rules(name, shape, family=self.config["model_type"],
                              tied=bool(self.config.get("tie_word_embeddings")), fold_norm=self.fold_norm)

    def extra_layer_input(self, name: str) -> tuple[int, str] | None:
        """The input RMSNorm weight when it is folded into the attention projections."""
        m = INPUT_NORM.match(name) if self.fold_norm else None
        return (int(m.group("layer")), INPUT_NORM_KEY) if m else None

    def check_dtype(self, dtype: str | None) -> None:
        if dtype == "float16":
            raise AttnconvError("DeepSeek-V3 output in float16 would zero its latent projection (scaled below "
                                "float16's range so that kv_a_layernorm acts linearly): pass --dtype bfloat16 or "
                                "float32")

    def config_out(self) -> dict:
        return self._config()[0]

    def planned_config(self, layout_config: dict) -> dict:
        return self.config_out()  # known before any layer is converted

    def format_record(self) -> dict[str, Any]:
        """The engine asked for, and every engine that loads the output."""
        return {"engine": self.settings.engine, "engines": engines_loading(self.config_out()),
                "input_norm_folded": self.fold_norm}

    def cache_values_per_token(self, keys: set[str]) -> int:
        return sum(r + self.rope_dim for r in self.kv_ranks)  # the latent and the one shared RoPE key

    def rope_description(self) -> str:
        return f"one shared RoPE key of {self.rope_dim}"

    # --- computation ---
    def convert_latent(self, layer: int, w: AttentionWeights, tensors: dict[str, Tensor],
                       stats: LayerStatistics | None, moments, phases) -> dict[str, Tensor]:
        norm = tensors.get(INPUT_NORM_KEY)
        norm = applied_norm(norm, self.config["model_type"]) if norm is not None else None
        return convert_deepseek_layer(w, kv_rank=self.kv_ranks[layer], rope_dim=self.rope_dim,
                                      init=self.settings.init, moments=moments, rope_select=self.settings.rope_select,
                                      q_rank=self.q_rank, phases=phases, input_norm=norm)

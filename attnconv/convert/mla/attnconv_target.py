"""`convert --to mla --format attnconv` streamed: a layer's attention as attnconv's exact MLA.

Each KV head keeps rope_dim of its RoPE dims (the pairs --rope-select chooses, per layer) beside a latent of
that layer's --kv-rank; biases and q/k norms are kept, every tensor outside attention is copied. The config
records each layer's kept pairs, so it is known only once the layers are converted. The layer functions are in
mla/attnconv_format.py; what both formats share in mla/target.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from attnconv.convert.attention_weights import AttentionShape, AttentionWeights
from attnconv.convert.mla import attnconv_shared as shared
from attnconv.convert.mla.attnconv_format import (
    attnconv_config,
    attnconv_output_shapes,
    cache_per_token,
    convert_attnconv_layer,
    max_kv_rank,
)
from attnconv.convert.mla.inmemory import LayerStatistics
from attnconv.convert.mla.rope import select_pairs
from attnconv.convert.mla.target import MlaTarget
from attnconv.families import source_family


@dataclass
class AttnconvMlaTarget(MlaTarget):
    """MLA in attnconv's format: exact structure, lossless at full rank; loads after `import attnconv`."""

    pairs: dict[int, Tensor] = field(default_factory=dict)  # kept pairs per layer, as converted

    @property
    def shared(self) -> bool:
        """--rope-key shared: one RoPE key for all heads (mla/attnconv_shared.py)."""
        return self.settings.rope_key == "shared"

    @staticmethod
    def default_rope_dim(shape: AttentionShape) -> int:
        return 2 * (shape.rotary_dim // 4)

    def prepare(self) -> None:
        if self.shared:  # before any calibration
            shared.check_shared(source_family(self.config).qk_norm)

    def max_kv_rank(self) -> int:
        return (shared.max_kv_rank if self.shared else max_kv_rank)(self.shape, self.rope_dim)

    # --- layout ---
    def layer_outputs(self, layer: int, keys: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        biases = dict(q_bias="q_proj.bias" in keys, kv_bias="k_proj.bias" in keys, o_bias="o_proj.bias" in keys)
        if self.shared:
            return shared.shared_output_shapes(self.shape, kv_rank=self.kv_ranks[layer], rope_dim=self.rope_dim,
                                               **biases)
        return attnconv_output_shapes(self.shape, kv_rank=self.kv_ranks[layer], rope_dim=self.rope_dim,
                                      qk_norm="k_norm.weight" in keys, **biases)

    def other_outputs(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...], str]]:
        return [(name, shape, "copy")]

    def config_out(self) -> dict:
        # a layer's pairs as converted; a layer not converted (dry run) gets the selection that needs no data
        pairs = [self.pairs[i] if i in self.pairs else self._pairs(None) for i in range(len(self.kv_ranks))]
        config = dict(self.config, num_key_value_heads=self.shape.n_kv_heads)
        return attnconv_config(config, kv_ranks=self.kv_ranks, rope_dim=self.rope_dim, pairs=pairs,
                               init=self.settings.init, rope_key=self.settings.rope_key)

    def planned_config(self, layout_config: dict) -> dict:
        return {}  # it records the pairs each layer keeps: known once the layers are converted

    def format_record(self) -> dict[str, Any]:
        pairs = {"rope_pairs": {i: p.tolist() for i, p in sorted(self.pairs.items())}} if self.pairs else {}
        return {"rope_key": self.settings.rope_key, **pairs}

    def cache_values_per_token(self, keys: set[str]) -> int:
        if self.shared:
            return sum(r + self.rope_dim for r in self.kv_ranks)
        return sum(cache_per_token(self.shape, r, self.rope_dim, "k_norm.weight" in keys) for r in self.kv_ranks)

    def rope_description(self) -> str:
        where = "shared by all heads" if self.shared else "per KV head"
        return f"RoPE {self.rope_dim} {where} ({self.settings.rope_select})"

    # --- computation ---
    def _pairs(self, stats: LayerStatistics | None) -> Tensor:
        n_keep, scores = self.rope_dim // 2, stats.pair_scores if stats else None
        select = shared.shared_pairs if self.shared else select_pairs
        return select(self.settings.rope_select, self.shape, n_keep, scores)

    def convert_latent(self, layer: int, w: AttentionWeights, tensors: dict[str, Tensor],
                       stats: LayerStatistics | None, moments, phases) -> dict[str, Tensor]:
        self.pairs[layer] = self._pairs(stats)
        if self.shared:
            return shared.convert_shared_layer(w, kv_rank=self.kv_ranks[layer], pairs=self.pairs[layer][0],
                                               init=self.settings.init, moments=moments, phases=phases)
        return convert_attnconv_layer(w, kv_rank=self.kv_ranks[layer], pairs=self.pairs[layer],
                                      init=self.settings.init, moments=moments, phases=phases)

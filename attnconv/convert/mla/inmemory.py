"""MLA conversion of a model loaded in memory: the reference composition of the pure functions.

The streaming CLI applies the same per-layer functions to tensors read from disk; this module is what tests,
measurements and experiments use: calibrate with forward hooks (a stand-in for the calibration runner), convert
every layer, and build the converted model with its state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attnconv.convert.attention_weights import AttentionWeights, from_hf_attention
from attnconv.convert.mla.attnconv_format import attnconv_config, convert_attnconv_layer
from attnconv.convert.mla.attnconv_shared import convert_shared_layer, shared_pairs
from attnconv.convert.mla.calibration import (
    AttentionPhaseCollector,
    InputMoments,
    MomentCollector,
    PairNormCollector,
)
from attnconv.convert.mla.deepseek import (
    applied_norm,
    convert_deepseek_layer,
    deepseek_config,
    deepseek_tensors,
    folds_input_norm,
)
from attnconv.convert.mla.rope import check_rope_dim, pair_scores, select_pairs


def _layers(model):
    return model.model.layers


def calibrate(model, ids: Tensor, make: Callable[[int], list], *, seq_len: int = 256, batch_size: int = 8) -> list:
    """Feed every layer's attention input to its collectors: make(layer_idx) -> collectors; returns them per layer.

    ids: [n] a token stream, cut into windows of seq_len (positions 0..seq_len-1 each).
    """
    layers = _layers(model)
    collectors = [make(i) for i in range(len(layers))]
    hooks = []
    for i, layer in enumerate(layers):
        def hook(module, args, kwargs, i=i):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # [b, t, hidden]
            pos = torch.arange(x.shape[1]).repeat(x.shape[0])
            for c in collectors[i]:
                c.update(x.reshape(-1, x.shape[-1]).float(), pos)
        hooks.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    n = (len(ids) // seq_len) * seq_len
    windows = ids[:n].reshape(-1, seq_len)
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                model(input_ids=windows[start:start + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return collectors


def layer_weights(model) -> list[AttentionWeights]:
    return [from_hf_attention(layer.self_attn, model.config) for layer in _layers(model)]


def _per_layer(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _non_attention_state(model) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".self_attn." not in k}


@dataclass
class LayerStatistics:
    """What calibration gives one layer: input moments, 2-norm pair scores, the attention's mean rotations."""

    moments: InputMoments
    pair_scores: Tensor | None  # [n_kv, rotary_pairs]; only for --rope-select 2-norm
    phases: Tensor | None  # [n_heads, rotary_pairs] complex
    attended: Tensor | None = None  # [hidden + 1]^2: keys weighted by the attention they get (merging KV heads)


def collect_statistics(model, ids: Tensor, *, phases: bool = False, seq_len: int = 256) -> list[LayerStatistics]:
    """One calibration pass over ids [n] with every collector the MLA conversions use."""
    weights = layer_weights(model)
    inv_freq = model.model.rotary_emb.inv_freq

    def make(i):
        out = [MomentCollector(model.config.hidden_size), PairNormCollector(weights[i])]
        return out + [AttentionPhaseCollector(weights[i], inv_freq)] if phases else out

    return [LayerStatistics(c[0].result(), pair_scores(*c[1].result(), weights[i].shape),
                            c[2].result() if phases else None)
            for i, c in enumerate(calibrate(model, ids, make, seq_len=seq_len))]


def _resolve(model, calibration, seq_len: int, phases: bool) -> list[LayerStatistics] | None:
    if calibration is None or isinstance(calibration, list):
        return calibration
    return collect_statistics(model, calibration, phases=phases, seq_len=seq_len)


def to_attnconv_mla(model, *, kv_rank: int | list[int], rope_dim: int, rope_select: str = "high",
                    init: str = "svd", calibration: Tensor | list[LayerStatistics] | None = None,
                    seq_len: int = 256, phases: bool = False, merged: list[AttentionWeights] | None = None,
                    rope_key: str = "per-kv-head"):
    """The attnconv-format MLA of a loaded Llama/Mistral/Qwen2/Qwen3/Gemma/Phi-3 model (float32).

    calibration: token ids [n] or statistics from collect_statistics; phases: rotate dropped query pairs by the
    source's mean rotation (needs calibration). merged: the layers to convert instead of the model's, with fewer
    KV heads (`merge_kv_heads`): the format holds that GQA exactly at kv_rank = kv_heads x head_dim with every
    RoPE dim kept, so the MLA starts from the best GQA of its cache and can go below it (the phases and 2-norm
    scores are the source heads' and do not apply). rope_key: "per-kv-head" (attnconv_format.py) or "shared"
    (one RoPE key for all heads, attnconv_shared.py).
    """
    from attnconv.models.mla import CLASSES, register_auto_classes

    register_auto_classes()
    weights = layer_weights(model)
    n_keep = check_rope_dim(rope_dim, weights[0].shape)
    stats = _resolve(model, calibration, seq_len, phases)
    source_config = model.config.to_dict()
    if merged is not None:
        if phases:
            raise ValueError("phases are the source heads' mean rotations; they do not apply to merged heads")
        weights = merged
        source_config["num_key_value_heads"] = merged[0].shape.n_kv_heads
    ranks = _per_layer(kv_rank, len(weights))
    state, all_pairs = _non_attention_state(model), []
    for i, w in enumerate(weights):
        st = stats[i] if stats else None
        scores = st.pair_scores if st and merged is None else None
        layer_phases = st.phases if st and phases else None
        if rope_key == "shared":
            pairs = shared_pairs(rope_select, w.shape, n_keep, scores)
            out = convert_shared_layer(w, kv_rank=ranks[i], pairs=pairs[0], init=init, moments=st and st.moments,
                                       phases=layer_phases)
        else:
            pairs = select_pairs(rope_select, w.shape, n_keep, scores)
            out = convert_attnconv_layer(w, kv_rank=ranks[i], pairs=pairs, init=init, moments=st and st.moments,
                                         phases=layer_phases)
        all_pairs.append(pairs)
        state.update({f"model.layers.{i}.self_attn.{k}": v for k, v in out.items()})
    config = attnconv_config(source_config, kv_ranks=ranks, rope_dim=rope_dim, pairs=all_pairs, init=init,
                             rope_key=rope_key)
    config_cls, _, causal_cls = CLASSES[model.config.model_type]
    mla = causal_cls(config_cls(**{k: v for k, v in config.items() if k not in ("model_type", "architectures")}))
    mla.load_state_dict(state, strict=True)
    return mla.eval()


def merge_kv_heads(model, stats: list[LayerStatistics], kv_heads: int,
                   method: str = "grouped+aligned+fit") -> list[AttentionWeights]:
    """Every layer's KV heads merged into kv_heads by a calibrated GQA method (gqa/calibrated.py; input metric)."""
    from attnconv.convert.gqa.calibrated import convert_layer

    return [convert_layer(w, st.moments.augmented(), kv_heads, method)[0]
            for w, st in zip(layer_weights(model), stats, strict=True)]


def to_deepseek_v3(model, *, kv_rank: int, rope_dim: int, rope_select: str = "high", init: str = "svd",
                   calibration: Tensor | list[LayerStatistics] | None = None, q_rank: int | None = None,
                   seq_len: int = 256, phases: bool = False):
    """The deepseek-v3-format MLA of a loaded model, as a stock transformers DeepseekV3ForCausalLM (float32).

    phases: rotate the NoPE part of query pairs by the source's mean rotation (needs calibration).
    Returns (model, notes).
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    weights = layer_weights(model)
    source = model.config.to_dict()
    config, notes = deepseek_config(source, weights[0].shape, kv_rank=kv_rank, rope_dim=rope_dim,
                                    rope_select=rope_select, q_rank=q_rank)
    stats = _resolve(model, calibration, seq_len, phases)
    family, fold = source["model_type"], folds_input_norm(q_rank, model.config.hidden_size)
    layers = []
    for i, w in enumerate(weights):
        st = stats[i] if stats else None
        norm = applied_norm(_layers(model)[i].input_layernorm.weight.detach(), family) if fold else None
        layers.append(convert_deepseek_layer(w, kv_rank=kv_rank, rope_dim=rope_dim, init=init, rope_select=rope_select,
                                             moments=st and st.moments, q_rank=q_rank,
                                             phases=st.phases if st and phases else None, input_norm=norm))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        state.update(dict(deepseek_tensors(name, tensor, family=family, tied=tied, fold_norm=fold,
                                           source_eps=float(source.get("rms_norm_eps") or 1e-6))))
    for i, out in enumerate(layers):
        state.update({f"model.layers.{i}.self_attn.{k}": v for k, v in out.items()})
    ds = DeepseekV3ForCausalLM(DeepseekV3Config(**{k: v for k, v in config.items() if k != "model_type"}))
    ds.load_state_dict(state, strict=True)
    return ds.eval(), notes

"""MHA/GQA -> MLA as a native transformers DeepseekV3ForCausalLM checkpoint (format "deepseek-v3").

Attention (per layer, after TransMLA): one RoPE key of `rope_dim` dims shared by all heads, found by RoRoPE
(mla/rope.py); every query head keeps its full source key dims as NoPE key (its KV head's key minus what the
shared RoPE key carries of it) and its values, both from one latent of `kv_rank` dims (mla/lowrank.py). GQA is an
MLA whose up-projection copies each KV head to its query heads, so kv_b_proj has one block per query head and
num_key_value_heads = num_attention_heads. Queries are multiplied by scale_source * sqrt(head_dim + rope_dim) so
that DeepSeek's 1/sqrt(qk_nope + qk_rope) scale gives the source's logits; their RoPE parts and the shared key
are permuted to DeepSeek's interleaved pair order (rope_interleave = true, which engines assume).

Not exact, by construction of the format: (1) RoPE moves to one shared key, so the rest of each kept frequency
and every dropped frequency lose their rotation (exact only when the source keys already share one RoPE key:
an MQA source keeping all pairs). With `phases` (calibration), those NoPE query pairs are rotated and scaled by
the source attention's mean rotation instead (AttentionPhaseCollector): on the reference model at full rank
this takes KL to the source from 0.81 to 0.61. (2) kv_a_layernorm always normalises the latent, which a real
model's latent does not tolerate: its RMS varies across tokens (SmolLM2-135M: 0.45-0.92 in layer 0, 1.0-2.5 in
layer 1), and dividing each token's keys and values by it destroyed the model. The conversion therefore makes the
norm linear: kv_a_proj scales the latent down until its mean square is LATENT_EPS_SHARE of the norm's eps, so x /
sqrt(mean(x^2) + eps) is x / sqrt(eps) to within that share, and kv_a_layernorm's weight multiplies sqrt(eps) back.
A query latent below the hidden size (--q-rank) is made linear the same way (q_a_proj, q_a_layernorm): normalised
per token, it rescaled each query's logits. Measured on SmolLM2 (8,192 calibration tokens from the first half of
WikiText-2 test, 16 x 512-token windows of the second half scored as llama.cpp does; source perplexity 24.0): 96 +
32 perplexity 29,880 -> 76.9 (KL 6.8 -> 1.15), MQA aligned+fit at the same cache 163 (KL 1.77); 64 + 64 114; full
rank 320 + 64 (the source's own cache size) 32.3, KL 0.28: the cost of (1), what the format cannot express (one
RoPE key for all heads), once the norm is linear. Exact only up to that share (1e-6 of each token's latent), in
float32 and bfloat16; float16 cannot hold the scaled kv_a_proj (and q_a_proj) rows (they fall below its smallest
normal number), so that tensor must be stored in bfloat16 or float32, in engines' formats too (GGUF: not f16 or a
quantisation with f16 scales).
The eps must be the same wherever the model runs: transformers builds kv_a_layernorm with eps 1e-6 whatever the
config says, engines read rms_norm_eps, so the config's rms_norm_eps is 1e-6 (KV_NORM_EPS). The other norms then
stay exact because the whole residual stream is scaled by sqrt(1e-6 / the source's eps) (embeddings, o_proj,
down_proj; `residual_scale`): an RMSNorm of lambda h with eps lambda^2 e is the RMSNorm of h with eps e.

What the format cannot express is refused with the reason (use --format attnconv for these):
- q_proj has no bias in DeepseekV3Attention (and vLLM loads no attention biases at all): Qwen2's q/k/v biases,
  Llama's attention_bias. TransMLA's Qwen2 "deepseek style" keeps the q bias only through its own modeling code
  (remote code), which this format exists to avoid.
- per-head q/k RMSNorm (Qwen3): a norm over each head's full key cannot act on a latent shared by all heads.
- RoPE scaling other than none (llama3, longrope, yarn, ...): DeepSeek's rotary covers rope_dim dims with its
  own yarn; the source's per-frequency scaling does not carry over.
- MLP biases (DeepseekV3MLP has none).
The query latent (q_rank) is exact at q_rank = hidden: the input RMSNorm's weight is folded into the attention's
input projections and written as ones (it feeds nothing else), q_a_proj is the identity and q_a_layernorm sees an
input of RMS 1 per token; llama.cpp needs a query latent (attnconv/engines.py).
Expressed exactly: Gemma's (1 + w) RMSNorms (weight + 1), its sqrt(hidden)-scaled tied embeddings (embed_tokens
scaled, lm_head the unscaled copy), GeGLU (hidden_act gelu_pytorch_tanh; note: vLLM's DeepSeek MLP runs only
silu); Phi-3's fused qkv_proj (split by the adapter) and gate_up_proj (split here); a sliding window becomes
max_position_embeddings = window (full attention equals it up to that length). Tied embeddings are always untied
(engines load lm_head.weight).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnconv.convert.attention_weights import AttentionShape, AttentionWeights
from attnconv.convert.mla.calibration import InputMoments
from attnconv.convert.mla.lowrank import check_rank, joint_low_rank
from attnconv.convert.mla.rope import check_rope_dim, interleave_permutation, shared_frequencies
from attnconv.convert.mla.shared_key import shared_key_layer
from attnconv.engines import DENSE_EXPERT_FIELDS
from attnconv.errors import AttnconvError
from attnconv.families import FAMILIES, ROPE_FAMILIES

_OTHER_FORMAT = "use --format attnconv, which keeps it exactly"
KV_NORM_EPS = 1e-6  # kv_a_layernorm's eps in transformers (its default, whatever the config says)
LATENT_EPS_SHARE = 1e-6  # the latent's mean square over that eps: how far from linear the latent norm is


def residual_scale(source_eps: float) -> float:
    """The factor on every residual-stream writer that turns the source's norm eps into KV_NORM_EPS exactly."""
    return (KV_NORM_EPS / source_eps) ** 0.5 if source_eps > 0 else 1.0


def linear_norm_shrink(square: float) -> float:
    """The factor on a latent's down-projection rows that brings its mean square (SQUARE, on the calibration data)
    to LATENT_EPS_SHARE of the norm's eps: the latent's RMSNorm then acts linearly (module docstring)."""
    return (LATENT_EPS_SHARE * KV_NORM_EPS / max(square, 1e-30)) ** 0.5


def linear_norm_weight(rank: int, shrink: float) -> Tensor:
    """The latent norm's weight that multiplies back what linear_norm_shrink took and the norm's 1/sqrt(eps)."""
    return torch.full((rank,), (KV_NORM_EPS * (1 + LATENT_EPS_SHARE)) ** 0.5 / shrink)


def check_layer(w: AttentionWeights) -> None:
    """Refuse source features DeepseekV3Attention cannot express."""
    if any(b is not None for b in (w.q_bias, w.k_bias, w.v_bias, w.o_bias)):
        raise AttnconvError("the source has attention biases (Qwen2's q/k/v, Llama's attention_bias), which "
                            f"DeepseekV3's q_proj cannot hold and DeepSeek engines do not load; {_OTHER_FORMAT}")
    if w.q_norm is not None or w.k_norm is not None:
        raise AttnconvError("the source normalises each q/k head (Qwen3's q_norm/k_norm), which has no place in "
                            f"DeepSeek-V3's attention (its latent is shared by all heads); {_OTHER_FORMAT}")


def folds_input_norm(q_rank: int | None, hidden: int) -> bool:
    """Whether a conversion folds the input RMSNorm's weight into attention (and writes it as ones): for the exact
    query latent, q_rank = hidden, whose q_a_layernorm must see an input of RMS 1 per token."""
    return q_rank == hidden


def fold_input_norm(tensors: dict[str, Tensor], norm: Tensor) -> dict[str, Tensor]:
    """The layer's attention tensors reading x / rms(x) instead of norm * x / rms(x): every projection that reads
    the attention input gets its columns scaled by the norm weight [hidden]. Exact: the input RMSNorm of a
    Llama-family layer feeds only its attention (the MLP has its own post_attention_layernorm)."""
    reads_input = ("q_proj.weight", "q_a_proj.weight", "kv_a_proj_with_mqa.weight")
    return {k: t * norm.float()[None] if k in reads_input else t for k, t in tensors.items()}


def exact_query_latent(q_flat: Tensor) -> dict[str, Tensor]:
    """q_a_proj = identity, q_a_layernorm = ones, q_b_proj = the queries: a query latent of rank hidden that changes
    nothing when the attention input has RMS 1 per token (fold_input_norm), up to q_a_layernorm's eps."""
    hidden = q_flat.shape[1]
    return {"q_a_proj.weight": torch.eye(hidden), "q_a_layernorm.weight": torch.ones(hidden),
            "q_b_proj.weight": q_flat}


def convert_deepseek_layer(w: AttentionWeights, *, kv_rank: int, rope_dim: int, init: str = "svd",
                           moments: InputMoments | None = None, rope_select: str = "high",
                           q_rank: int | None = None, phases: Tensor | None = None,
                           input_norm: Tensor | None = None) -> dict[str, Tensor]:
    """One layer's DeepseekV3Attention tensors (names relative to `model.layers.N.self_attn.`).

    The latent is scaled so that kv_a_layernorm acts linearly (module docstring), by its mean square on the
    calibration data (`moments`; without them, under E[xx^T] = I, which the LATENT_EPS_SHARE margin covers).
    phases: [n_heads, rotary_pairs] complex (AttentionPhaseCollector): the NoPE part of every query pair is
    rotated and scaled by the source's mean rotation instead of losing its rotation outright.
    input_norm: the layer's input RMSNorm weight as applied ([hidden]), given when the caller writes that norm as
    ones (folds_input_norm): it is folded into the projections; with q_rank = hidden the query latent is exact.
    """
    s = w.shape
    check_layer(w)
    n_keep = check_rope_dim(rope_dim, s)
    pairs, _ = shared_frequencies(rope_select, s, n_keep)
    d = s.head_dim
    layer = shared_key_layer(w, kv_rank=kv_rank, pairs=pairs, init=init, moments=moments, phases=phases)
    down, stats = layer.down, layer.stats
    perm = interleave_permutation(rope_dim)
    q_all = torch.cat([layer.q_nope, layer.q_rope[:, perm]], dim=1) * (s.scaling * (d + rope_dim) ** 0.5)  # (d+d_r)^-.5

    shrink = linear_norm_shrink(float((moments if moments is not None else stats).of_linear(down).diagonal().mean()))
    out = {
        "kv_a_proj_with_mqa.weight": torch.cat([down * shrink, layer.rope_key[perm]]),  # [r + d_r, D]
        "kv_a_layernorm.weight": linear_norm_weight(kv_rank, shrink),
        "kv_b_proj.weight": layer.kv_b.reshape(-1, kv_rank),  # [n_heads * 2d, r], per head [k_nope; v]
        "o_proj.weight": w.o * residual_scale(w.norm_eps),
    }
    q_flat = q_all.reshape(-1, s.hidden)  # [n_heads * (d + d_r), hidden]
    if input_norm is not None and q_rank == s.hidden:
        return {**fold_input_norm(out, input_norm), **exact_query_latent(q_flat * input_norm.float()[None])}
    if q_rank is None:
        out["q_proj.weight"] = q_flat
    else:
        check_rank(q_rank, min(s.hidden, q_flat.shape[0]), "--q-rank",
                   "dims a query latent can have (the smaller of the hidden size and the query rows)")
        q_stats = moments if moments is not None else stats
        q_low = joint_low_rank(None, q_rank, factor=q_stats.factor_of_linear(q_flat))
        q_down = q_low.down @ q_flat
        q_shrink = linear_norm_shrink(float(q_stats.of_linear(q_down).diagonal().mean()))
        out.update({"q_a_proj.weight": q_down * q_shrink, "q_a_layernorm.weight": linear_norm_weight(q_rank, q_shrink),
                    "q_b_proj.weight": q_low.up})
    return out if input_norm is None else fold_input_norm(out, input_norm)


def deepseek_output_shapes(shape: AttentionShape, *, kv_rank: int, rope_dim: int,
                           q_rank: int | None = None) -> dict[str, tuple]:
    """The shapes convert_deepseek_layer will produce, without computing anything (for a dry run's plan)."""
    s, d = shape, shape.head_dim
    q_rows = s.n_heads * (d + rope_dim)
    out = {"kv_a_proj_with_mqa.weight": (kv_rank + rope_dim, s.hidden), "kv_a_layernorm.weight": (kv_rank,),
           "kv_b_proj.weight": (s.n_heads * 2 * d, kv_rank), "o_proj.weight": (s.hidden, s.n_heads * d)}
    if q_rank is None:
        out["q_proj.weight"] = (q_rows, s.hidden)
    else:
        out.update({"q_a_proj.weight": (q_rank, s.hidden), "q_a_layernorm.weight": (q_rank,),
                    "q_b_proj.weight": (q_rows, q_rank)})
    return out


def _rope(config: dict) -> tuple[str, float]:
    """(rope type, theta) from a config.json dict, new (rope_parameters) or old (rope_theta/rope_scaling) style."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    return rope_type, float(theta)


def deepseek_config(source: dict, shape: AttentionShape, *, kv_rank: int, rope_dim: int, rope_select: str = "high",
                    q_rank: int | None = None) -> tuple[dict, list[str]]:
    """config.json of the deepseek-v3 output and notes on what changed; refuses what the format cannot express.

    source: the source's config.json dict; shape: its attention shape (one layer's).
    """
    family = source.get("model_type")
    if family not in ROPE_FAMILIES:
        raise AttnconvError(f"--format deepseek-v3 supports {', '.join(ROPE_FAMILIES)}, not {family!r}")
    record = FAMILIES[family]
    if record.has_bias("qkv", source) or record.has_bias("o", source):
        raise AttnconvError(f"{family} has attention biases; DeepseekV3's q_proj has no bias and DeepSeek "
                            f"engines load none; {_OTHER_FORMAT}")
    if record.qk_norm:
        raise AttnconvError(f"{family} normalises each q/k head (q_norm/k_norm) before RoPE, which DeepSeek-V3's "
                            f"attention cannot express; {_OTHER_FORMAT}")
    if source.get("mlp_bias"):
        raise AttnconvError(f"the source's MLPs have biases, which DeepseekV3's MLP lacks; {_OTHER_FORMAT}")
    rope_type, theta = _rope(source)
    if rope_type != "default":
        raise AttnconvError(f"the source's RoPE scaling {rope_type!r} does not carry over to DeepSeek's rotary "
                            f"(which spans only --rope-dim dims and knows yarn alone); {_OTHER_FORMAT}")
    n_keep = check_rope_dim(rope_dim, shape)
    _, step = shared_frequencies(rope_select, shape, n_keep)
    notes = []
    max_positions = source.get("max_position_embeddings", 4096)
    window = record.sliding_window(source)
    if window is not None and window < max_positions:
        notes.append(f"the source attends over a sliding window of {window} tokens: max_position_embeddings "
                     f"{max_positions} -> {window}, where full attention equals it")
        max_positions = window
    act = source.get("hidden_act") or source.get("hidden_activation") or "silu"
    act = record.act_aliases.get(act, act)
    if act != "silu":
        notes.append(f"hidden_act {act}: transformers runs it; vLLM's DeepSeek MLP runs only silu")
    eps = source.get("rms_norm_eps", KV_NORM_EPS)
    if eps != KV_NORM_EPS:
        notes.append(f"rms_norm_eps {eps:g} -> {KV_NORM_EPS:g} (transformers' kv_a_layernorm eps, which engines read "
                     f"from the config), the residual stream scaled by {residual_scale(eps):.6g} to keep every norm")
    if step > 1 or rope_dim < shape.rotary_dim:
        notes.append(f"RoPE keeps source pairs 0, {step}, ... ({n_keep} of {shape.rotary_pairs}); rope_theta "
                     f"{theta:g} -> {theta ** (step * rope_dim / shape.rotary_dim):g} gives them their frequencies")
    layers = source["num_hidden_layers"]
    intermediate = source["intermediate_size"]
    config = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": source["vocab_size"], "hidden_size": source["hidden_size"],
        "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": shape.n_heads, "num_key_value_heads": shape.n_heads,
        "kv_lora_rank": kv_rank, "q_lora_rank": q_rank, "qk_rope_head_dim": rope_dim,
        "qk_nope_head_dim": shape.head_dim, "v_head_dim": shape.head_dim,
        # dense MLPs everywhere: no layer reaches first_k_dense_replace, so no expert is built; the expert fields
        # are those every engine accepts (attnconv/engines.py)
        "first_k_dense_replace": layers, **DENSE_EXPERT_FIELDS, "moe_intermediate_size": intermediate,
        "num_nextn_predict_layers": 0, "hidden_act": act, "max_position_embeddings": max_positions,
        "rms_norm_eps": KV_NORM_EPS, "initializer_range": source.get("initializer_range", 0.02),
        "rope_theta": theta ** (step * rope_dim / shape.rotary_dim), "rope_scaling": None,
        "rope_interleave": True, "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "use_cache": True, "bos_token_id": source.get("bos_token_id"), "eos_token_id": source.get("eos_token_id"),
        "pad_token_id": source.get("pad_token_id"),
    }
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}
    for key in ("dtype", "torch_dtype"):
        if key in source:
            config[key] = source[key]
    return config, notes


def deepseek_rules(name: str, shape: tuple[int, ...], *, family: str, tied: bool,
                   fold_norm: bool = False) -> list[tuple[str, tuple[int, ...], str]]:
    """What a source tensor outside attention becomes in deepseek-v3 format, without reading it:
    [(output name, output shape, transform)] with transform one of TRANSFORMS (attention goes through
    convert_deepseek_layer). tied: the source ties lm_head to embed_tokens (the output always writes lm_head).
    fold_norm: the input RMSNorms are folded into attention (folds_input_norm) and written as ones."""
    record = FAMILIES[family]
    if ".self_attn." in name:
        return []
    if fold_norm and name.endswith("input_layernorm.weight"):
        return [(name, shape, "ones")]
    if record.norm_plus_one and name.endswith("norm.weight"):  # Gemma's RMSNorm multiplies by (1 + w)
        return [(name, shape, "plus_one")]
    if name.endswith("embed_tokens.weight"):  # Gemma scales embeddings by sqrt(hidden)
        out = [(name, shape, "scale_embedding" if record.embed_scale else "residual")]
        return out + [("lm_head.weight", shape, "copy")] if tied else out
    if name.endswith("mlp.down_proj.weight"):
        return [(name, shape, "residual")]
    fused = f"mlp.{record.fused_gate_up}.weight"
    if record.fused_gate_up and name.endswith(fused):  # rows: gate | up
        stem, half = name.removesuffix(fused), (shape[0] // 2, *shape[1:])
        return [(stem + "mlp.gate_proj.weight", half, "first_half"),
                (stem + "mlp.up_proj.weight", half, "second_half")]
    return [(name, shape, "copy")]


def _scale_embedding(t: Tensor, residual: float) -> Tensor:
    scale = torch.tensor(t.shape[1] ** 0.5, dtype=t.dtype).float()  # rounded as Gemma rounds it
    return (t.float() * scale * residual).to(t.dtype)


def _residual(t: Tensor, residual: float) -> Tensor:
    return t if residual == 1.0 else (t.float() * residual).to(t.dtype)


# kind -> f(tensor, residual_scale of the source's eps)
TRANSFORMS = {"copy": lambda t, r: t, "plus_one": lambda t, r: (t.float() + 1.0).to(t.dtype),
              "ones": lambda t, r: torch.ones_like(t), "scale_embedding": _scale_embedding, "residual": _residual,
              "first_half": lambda t, r: t.chunk(2, dim=0)[0], "second_half": lambda t, r: t.chunk(2, dim=0)[1]}


def deepseek_tensors(name: str, tensor: Tensor, *, family: str, tied: bool, source_eps: float = KV_NORM_EPS,
                     fold_norm: bool = False) -> list[tuple[str, Tensor]]:
    """A source tensor outside attention -> its deepseek-v3 tensors (deepseek_rules applied)."""
    return [(out, TRANSFORMS[kind](tensor, residual_scale(source_eps)))
            for out, _, kind in deepseek_rules(name, tuple(tensor.shape), family=family, tied=tied,
                                               fold_norm=fold_norm)]


def applied_norm(weight: Tensor, family: str) -> Tensor:
    """An RMSNorm weight as the source applies it (Gemma multiplies by 1 + w), float32."""
    return weight.float() + 1.0 if FAMILIES[family].norm_plus_one else weight.float()

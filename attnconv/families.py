"""One declarative record per model family: where its attention tensors live, which config keys hold its head
counts, what a token costs in its KV cache, and which of attnconv's paths support it.

Everything family-specific is here; conversions, the KV arithmetic, the decode loop and the test helpers read it.
Torch-free and transformers-free: a record reads a config.json dict and a transformers config object alike, and
names transformers' classes only by model_type (resolved through its Auto mappings where they are used).
A new Llama-like family is one more record (`register_family` adds one at run time).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from attnconv.errors import AttnconvError
from attnconv.model_shape import CacheShape, HeadLayout, config_value


@dataclass(frozen=True)
class Family:
    """Where one family keeps its attention tensors, and what attnconv does with it.

    `ops` maps a regex over tensor names to the convert op (attnconv/convert/ops.py) that writes that tensor;
    every other tensor is copied (left out: a Llama-like source's, from `fused_qkv`). `kv_heads` and `kv_values`
    give the KV heads and the values a token caches per layer where the config does not say them the usual way
    (n_kv_key; 2 x n_kv x head_dim). The Llama-like fields (biases to the end) say how its attention and layers
    differ from Llama's: what the MLA formats (and attnconv's MLA classes) keep or refuse.
    """

    name: str
    model_types: tuple[str, ...]
    example: str
    ops: dict[str, str] | None = None
    n_heads_key: str = "num_attention_heads"
    n_kv_key: str | None = "num_key_value_heads"
    layers_key: str = "num_hidden_layers"
    hidden_key: str = "hidden_size"
    head_dim_key: str | None = "head_dim"
    rope: str = "rotate_half"
    source: bool = True  # attnconv converts checkpoints of this family
    decode: bool = False  # attnconv's decode loop runs it (its attention calls transformers' attention interface)
    target_model_type: str | None = None  # written as another family (GPT-2 -> GPTBigCode)
    allowed_kv_heads: str = "divisors"  # or "mqa_or_mha"
    kv_heads: Callable[[Any], int] | None = None
    kv_values: Callable[[Any], int] | None = None
    latent_cache: bool = False  # MLA: kv_values counts a latent row per token, shared by every head
    hf_name: str = ""  # transformers' class prefix (Llama -> LlamaForCausalLM); names the attnconv MLA classes
    # Llama-like attention: biases of q/k/v and of o, each "attention_bias" (the config's flag), "always" or "never"
    qkv_bias: str = "attention_bias"
    o_bias: str = "attention_bias"
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3; class <hf_name>RMSNorm)
    window: str = "none"  # sliding window: "none", "global" (sliding_window), "layer_types" (Qwen2's per layer)
    fused_qkv: str | None = None  # one attention projection with rows q | k | v (Phi-3: "qkv_proj")
    fused_gate_up: str | None = None  # one MLP projection with rows gate | up (Phi-3: "gate_up_proj")
    norm_plus_one: bool = False  # RMSNorms multiply by (1 + w) (Gemma)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma)
    act_aliases: dict[str, str] = field(default_factory=dict)  # config activation name -> what the family runs
    tiny_config: Callable[..., dict] | None = None  # sizes -> config kwargs of a tiny test model (attnconv.testing)
    decode_cache: str = "kv"  # the decode loop's cache: "kv" (per-head K/V), "deepseek_latent", "attnconv_latent"

    def __post_init__(self):
        if self.ops is None:  # a Llama-like source: its K/V projections (or its fused q|k|v) change
            ops = ({rf"\.self_attn\.{self.fused_qkv}\.weight$": "fused_qkv"} if self.fused_qkv
                   else dict(_LLAMA_LIKE) if self.source else {})
            object.__setattr__(self, "ops", ops)

    def has_bias(self, which: str, config: Any) -> bool:
        """Whether the "qkv" or "o" projections of a model of this family have biases."""
        kind = self.qkv_bias if which == "qkv" else self.o_bias
        return kind == "always" or (kind == "attention_bias" and bool(config_value(config, "attention_bias")))

    def sliding_window(self, config: Any, layer: int | None = None) -> int | None:
        """The sliding window of `layer` (None: the window the config asks of every layer), or None: full."""
        window = config_value(config, "sliding_window")
        if self.window == "global":
            return window
        if self.window == "layer_types":
            if layer is None:
                return window if config_value(config, "use_sliding_window") else None
            types = config_value(config, "layer_types")
            return window if types is not None and types[layer] == "sliding_attention" else None
        return None

    def layout(self, config: Any) -> HeadLayout:
        n_heads = config_value(config, self.n_heads_key)
        n_kv = config_value(config, self.n_kv_key) if self.n_kv_key else None
        n_kv = self.kv_heads(config) if self.kv_heads else n_heads if n_kv is None else n_kv
        hidden = config_value(config, self.hidden_key)
        head_dim = (config_value(config, self.head_dim_key) if self.head_dim_key else None) or hidden // n_heads
        return HeadLayout(n_heads, n_kv, head_dim, hidden, config_value(config, self.layers_key), self.rope)

    def cache_shape(self, config: Any) -> CacheShape:
        lay = self.layout(config)
        values = self.kv_values(config) if self.kv_values else 2 * lay.n_kv_heads * lay.head_dim
        if isinstance(values, bool) or not isinstance(values, (int, float)) or not values > 0:
            raise AttnconvError(f"config.json of this {self.name} model does not say how many values a token caches "
                                f"per layer (got {values!r}); the checkpoint is incomplete: convert it again")
        return CacheShape(lay.layers, lay.n_heads, lay.n_kv_heads, lay.head_dim, values, self.latent_cache)

    def op_for(self, tensor_name: str) -> str:
        for pattern, op in self.ops.items():
            if re.search(pattern, tensor_name):
                return op
        return "copy"


_LLAMA_LIKE = {r"\.self_attn\.[kv]_proj\.(weight|bias)$": "kv_proj"}
_GPT2_CONV1D = {r"\.attn\.c_attn\.(weight|bias)$": "gpt2_c_attn", r"\.attn\.c_proj\.weight$": "transpose",
                r"\.mlp\.c_fc\.weight$": "transpose", r"\.mlp\.c_proj\.weight$": "transpose"}


def llama_tiny_config(*, vocab: int, hidden: int, layers: int, n_heads: int, n_kv_heads: int, max_positions: int,
                      init_std: float, head_dim: bool = False, **fixed) -> dict:
    """Config kwargs of a tiny Llama-like test model. head_dim: write it (where the family's default is not
    hidden / heads); `fixed`: the family's own values."""
    sizes = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                 num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, max_position_embeddings=max_positions,
                 initializer_range=init_std, tie_word_embeddings=False)
    return {**sizes, **({"head_dim": hidden // n_heads} if head_dim else {}), **fixed}


def _gpt2_tiny_config(*, vocab: int, hidden: int, layers: int, n_heads: int, n_kv_heads: int, max_positions: int,
                      init_std: float) -> dict:
    if n_kv_heads != n_heads:
        raise ValueError("GPT-2 has no grouped form")
    return dict(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=n_heads, n_positions=max_positions,
                initializer_range=init_std, bos_token_id=vocab - 1, eos_token_id=vocab - 1)


_SOURCES = [
    Family("llama", ("llama",), "meta-llama/Llama-3.2-1B", decode=True, hf_name="Llama",
           tiny_config=llama_tiny_config),
    Family("mistral", ("mistral",), "mistralai/Mistral-7B-v0.1", decode=True, hf_name="Mistral",
           qkv_bias="never", o_bias="never", window="global",
           tiny_config=partial(llama_tiny_config, sliding_window=None)),
    Family("qwen2", ("qwen2",), "Qwen/Qwen2.5-0.5B", decode=True, hf_name="Qwen2",
           qkv_bias="always", o_bias="never", window="layer_types", tiny_config=llama_tiny_config),
    Family("qwen3", ("qwen3",), "Qwen/Qwen3-0.6B", decode=True, hf_name="Qwen3", qk_norm=True, window="layer_types",
           tiny_config=partial(llama_tiny_config, head_dim=True)),
    Family("gemma", ("gemma",), "google/gemma-2b", decode=True, hf_name="Gemma", norm_plus_one=True, embed_scale=True,
           act_aliases={"gelu": "gelu_pytorch_tanh"},  # what transformers' Gemma runs for either name
           tiny_config=partial(llama_tiny_config, head_dim=True, tie_word_embeddings=True)),
    Family("phi3", ("phi3",), "microsoft/Phi-3-mini-4k-instruct", decode=True, hf_name="Phi3",
           qkv_bias="never", o_bias="never", window="global", fused_qkv="qkv_proj", fused_gate_up="gate_up_proj",
           tiny_config=partial(llama_tiny_config, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    Family("gpt2", ("gpt2",), "openai-community/gpt2", _GPT2_CONV1D, n_heads_key="n_head", n_kv_key=None,
           layers_key="n_layer", hidden_key="n_embd", head_dim_key=None, rope="none",
           target_model_type="gpt_bigcode", allowed_kv_heads="mqa_or_mha", hf_name="GPT2",
           tiny_config=_gpt2_tiny_config),
]


class _Names(Sequence):
    """Family names read from FAMILIES at each use, so that a family registered later is among them."""

    def __init__(self, keep: Callable[[Family], bool], form: str = "{}"):
        self._keep, self._form = keep, form

    def _names(self) -> tuple[str, ...]:
        return tuple(self._form.format(f.name) for f in FAMILIES.values() if self._keep(f))

    def __getitem__(self, i):
        return self._names()[i]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __repr__(self) -> str:
        return repr(self._names())


def _rotary_source(f: Family) -> bool:
    return f.source and f.rope != "none"


# The families with rotary attention: what the calibrated GQA methods, MLA (both formats) and calibration take.
ROPE_FAMILIES: Sequence[str] = _Names(_rotary_source)


def mla_architecture(family: str) -> tuple[str, str]:
    """(model_type, architecture) of a RoPE family's attnconv-format MLA: llama -> llama_mla, LlamaMLAForCausalLM."""
    return f"{family}_mla", f"{FAMILIES[family].hf_name}MLAForCausalLM"


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        *_SOURCES,
        # Outputs (and decode) only. MLA in DeepSeek-V3's format: every head reads one cached row per token, the
        # latent and the shared RoPE key; head_dim is the value head size, so the K/V rows `attnconv info` sets
        # beside it are its MHA equivalent.
        Family("deepseek_v3", ("deepseek_v3",), "deepseek-ai/DeepSeek-V3", head_dim_key="v_head_dim", source=False,
               decode=True, kv_heads=lambda c: 1, latent_cache=True, decode_cache="deepseek_latent",
               kv_values=lambda c: config_value(c, "kv_lora_rank") + config_value(c, "qk_rope_head_dim")),
        # Outputs only: what GPT-2 conversions are written as, and attnconv's MLA format (a latent per token and
        # layer plus one RoPE key per KV head; decode: patches/attnconv_mla.py).
        Family("gpt_bigcode", ("gpt_bigcode",), "bigcode/gpt_bigcode-santacoder", n_heads_key="n_head",
               n_kv_key=None, layers_key="n_layer", hidden_key="n_embd", head_dim_key=None, rope="none",
               source=False, kv_heads=lambda c: 1 if config_value(c, "multi_query") else config_value(c, "n_head")),
        Family("attnconv_mla", _Names(_rotary_source, "{}_mla"),
               "attnconv convert --to mla --format attnconv", source=False, decode=True, latent_cache=True,
               kv_values=lambda c: config_value(c, "kv_cache_dim_per_layer"), decode_cache="attnconv_latent"),
    ]
}
SOURCE_FAMILIES: Sequence[str] = _Names(lambda f: f.source)


_ON_CHANGE: list[Callable[[], None]] = []  # run when a family is registered or unregistered


def on_family_change(hook: Callable[[], None]) -> None:
    """Have `hook` run whenever FAMILIES changes (attnconv.models.mla registers or forgets a family's MLA classes)."""
    _ON_CHANGE.append(hook)


def register_family(family: Family) -> None:
    """Add a family's record (a source to convert: a Llama-like one needs nothing else); `unregister_family` takes
    it away. Its transformers classes must be registered with the Auto classes under its model_type first."""
    taken = {t for f in FAMILIES.values() for t in f.model_types}
    if family.name in FAMILIES or taken.intersection(family.model_types):
        raise AttnconvError(f"family {family.name!r} (model types {', '.join(family.model_types)}) is already known")
    FAMILIES[family.name] = family
    try:
        for hook in _ON_CHANGE:
            hook()
    except Exception:
        unregister_family(family.name)
        raise


def unregister_family(name: str) -> None:
    if FAMILIES.pop(name, None) is not None:
        for hook in _ON_CHANGE:
            hook()


def supported_families() -> str:
    return ", ".join(f"{f.name} (e.g. {f.example})" for f in FAMILIES.values() if f.source)


def family_of(config: Any) -> Family | None:
    """The record for a config (dict or object), or None for a family attnconv does not know."""
    model_type = config_value(config, "model_type")
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


def source_family(config: dict) -> Family:
    """The family of a checkpoint to convert, or a refusal that lists what is supported."""
    family = family_of(config)
    if family is None or not family.source:
        archs = ", ".join(config.get("architectures") or []) or "unknown architecture"
        raise AttnconvError(f"model_type {config.get('model_type')!r} ({archs}) is not supported; supported "
                            f"families: {supported_families()}")
    return family


def cache_shape(config: Any) -> CacheShape:
    """KV-cache shape of any causal-LM config: a known family's own rule, else the usual Llama-style keys."""
    family = family_of(config)
    if family is not None:
        return family.cache_shape(config)
    layers = config_value(config, "num_hidden_layers", "n_layer")
    n_heads = config_value(config, "num_attention_heads", "n_head")
    hidden = config_value(config, "hidden_size", "n_embd")
    head_dim = config_value(config, "head_dim", default=hidden // n_heads)
    n_kv = config_value(config, "num_key_value_heads", default=n_heads)
    return CacheShape(layers, n_heads, n_kv, head_dim, 2 * n_kv * head_dim)


def check_kv_heads(family: Family, layout: HeadLayout, kv_heads: int) -> None:
    """--kv-heads must divide the query heads and the source's KV heads (pooling only merges heads)."""
    if kv_heads > layout.n_kv_heads:
        raise AttnconvError(
            f"--kv-heads {kv_heads} exceeds the source's {layout.n_kv_heads} KV heads; pooling can only merge "
            f"heads: choose a divisor of {layout.n_kv_heads}"
        )
    if layout.n_heads % kv_heads or layout.n_kv_heads % kv_heads:
        divisors = [d for d in range(1, layout.n_kv_heads + 1) if layout.n_kv_heads % d == 0]
        raise AttnconvError(
            f"--kv-heads {kv_heads} does not divide the {layout.n_heads} query heads and {layout.n_kv_heads} KV "
            f"heads; choose one of {divisors}"
        )
    if family.allowed_kv_heads == "mqa_or_mha" and kv_heads not in (1, layout.n_heads):
        raise AttnconvError(
            f"{family.name} is written as {family.target_model_type}, which has only MQA (1 KV head) or MHA "
            f"({layout.n_heads}); use --to mqa or --kv-heads {layout.n_heads}"
        )

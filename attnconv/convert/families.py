"""One declarative adapter per model family: where q/k/v/o live and which config keys hold head counts.

Conversions never see family names: an adapter turns a checkpoint's tensor names and config into the
neutral form (`HeadLayout` + which tensor holds which projection, in which layout), and back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from attnconv.errors import AttnconvError


@dataclass(frozen=True)
class HeadLayout:
    """The attention shape of a model, family-free."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    layers: int
    rope: str = "rotate_half"  # HF Llama-style rotary on halves; "none" for learned positions (GPT-2)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class Adapter:
    """Where one family keeps its attention tensors.

    `kv_tensors` maps a regex over tensor names to the role of that tensor:
      "k" / "v"      separate projections, Linear layout [n_kv * head_dim, hidden] (+ bias [n_kv * head_dim])
      "qkv"          a fused projection [(n_heads + 2 n_kv) * head_dim, hidden], rows q | k | v (Phi-3)
      "qkv_conv1d"   GPT-2's Conv1D c_attn [hidden, 3 * hidden] (+ bias [3 * hidden]), columns q | k | v
    `linear_conv1d`: other GPT-2 Conv1D weights ([in, out]) that the target family stores as Linear ([out, in]).
    """

    name: str
    model_types: tuple[str, ...]
    example: str
    kv_tensors: dict[str, str]
    n_heads_key: str = "num_attention_heads"
    n_kv_key: str | None = "num_key_value_heads"
    layers_key: str = "num_hidden_layers"
    hidden_key: str = "hidden_size"
    head_dim_key: str | None = "head_dim"
    rope: str = "rotate_half"
    # A family without a grouped form is written as another one (GPT-2 -> GPTBigCode, MQA only).
    target_model_type: str | None = None
    allowed_kv_heads: str = "divisors"  # or "mqa_or_mha"
    linear_conv1d: tuple[str, ...] = field(default_factory=tuple)

    def layout(self, config: dict) -> HeadLayout:
        n_heads = config[self.n_heads_key]
        n_kv = config.get(self.n_kv_key) if self.n_kv_key else None
        n_kv = n_heads if n_kv is None else n_kv
        hidden = config[self.hidden_key]
        head_dim = (config.get(self.head_dim_key) if self.head_dim_key else None) or hidden // n_heads
        return HeadLayout(n_heads, n_kv, head_dim, hidden, config[self.layers_key], self.rope)

    def role(self, tensor_name: str) -> str | None:
        for pattern, role in self.kv_tensors.items():
            if re.search(pattern, tensor_name):
                return role
        return None


_LLAMA_LIKE = {r"\.self_attn\.k_proj\.(weight|bias)$": "k", r"\.self_attn\.v_proj\.(weight|bias)$": "v"}

ADAPTERS: dict[str, Adapter] = {
    a.name: a
    for a in [
        Adapter("llama", ("llama",), "meta-llama/Llama-3.2-1B", _LLAMA_LIKE),
        Adapter("mistral", ("mistral",), "mistralai/Mistral-7B-v0.1", _LLAMA_LIKE),
        Adapter("qwen2", ("qwen2",), "Qwen/Qwen2.5-0.5B", _LLAMA_LIKE),  # q/k/v biases
        Adapter("qwen3", ("qwen3",), "Qwen/Qwen3-0.6B", _LLAMA_LIKE),  # per-head q/k norms, shared over heads
        Adapter("gemma", ("gemma",), "google/gemma-2b", _LLAMA_LIKE),
        Adapter("phi3", ("phi3",), "microsoft/Phi-3-mini-4k-instruct",
                {r"\.self_attn\.qkv_proj\.weight$": "qkv"}),
        Adapter("gpt2", ("gpt2",), "openai-community/gpt2", {r"\.attn\.c_attn\.(weight|bias)$": "qkv_conv1d"},
                n_heads_key="n_head", n_kv_key=None, layers_key="n_layer", hidden_key="n_embd", head_dim_key=None,
                rope="none", target_model_type="gpt_bigcode", allowed_kv_heads="mqa_or_mha",
                linear_conv1d=(r"\.attn\.c_proj\.weight$", r"\.mlp\.c_fc\.weight$", r"\.mlp\.c_proj\.weight$")),
    ]
}


def supported_families() -> str:
    return ", ".join(f"{a.name} (e.g. {a.example})" for a in ADAPTERS.values())


def adapter_for(config: dict) -> Adapter:
    """The adapter for a config.json dict, or a refusal that lists what is supported."""
    model_type = config.get("model_type")
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    archs = ", ".join(config.get("architectures") or []) or "unknown architecture"
    raise AttnconvError(
        f"model_type {model_type!r} ({archs}) is not supported; supported families: {supported_families()}"
    )


def check_kv_heads(adapter: Adapter, layout: HeadLayout, kv_heads: int) -> None:
    """--kv-heads must divide the query heads and the source's KV heads (pooling only merges heads)."""
    if kv_heads < 1:
        raise AttnconvError(f"--kv-heads must be >= 1, got {kv_heads}")
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
    if adapter.allowed_kv_heads == "mqa_or_mha" and kv_heads not in (1, layout.n_heads):
        raise AttnconvError(
            f"{adapter.name} is written as {adapter.target_model_type}, which has only MQA (1 KV head) or MHA "
            f"({layout.n_heads}); use --to mqa or --kv-heads {layout.n_heads}"
        )

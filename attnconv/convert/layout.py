"""What a conversion reads and how its output is laid out, known from config.json and shard headers alone.

Torch-free on purpose: `convert` starts copying the tensors it leaves unchanged while the main thread is
still importing torch, and the plan (which needs torch to infer the converted shapes) follows this layout.
Within each output shard the unchanged tensors come first, in source order, then the converted ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from attnconv.convert.families import Adapter, HeadLayout, adapter_for, check_kv_heads
from attnconv.convert.tensor_io import CheckpointReader, TensorMeta, header_reserve, st_dtype
from attnconv.errors import AttnconvError
from attnconv.hub import canonical_dtype, resolve_source, weight_files

# Files never copied: weights (rewritten), config (rewritten), the source's card and any remote code.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".py")
_SKIP_NAMES = {"config.json", "attnconv.json", "README.md", ".gitattributes", "model.safetensors.index.json",
               "pytorch_model.bin.index.json"}
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old GPT-2 checkpoints


@dataclass(frozen=True)
class Entry:
    """One output tensor before its shape is known: where it comes from and what happens to it."""

    output: str
    meta: TensorMeta  # the source tensor
    op: str  # copy | transpose | kv_proj | fused_qkv | gpt2_c_attn
    out_dtype: str  # safetensors dtype name
    raw: bool  # copied as bytes: unchanged, same dtype, from a safetensors file


@dataclass
class Source:
    """A checked conversion request: the source, its heads before and after, and the output layout."""

    spec: str
    path: Path
    adapter: Adapter
    layout_in: HeadLayout
    layout_out: HeadLayout
    dtype: str | None  # output dtype name ('bfloat16', ...) or None to keep the source's
    reader: CheckpointReader
    config_out: dict
    files_to_copy: list[str]
    shards: dict[str, list[Entry]] = field(default_factory=dict)

    def reserve(self, shard: str) -> int:
        """Header bytes to reserve in an output shard (names may gain a 12-character prefix)."""
        return header_reserve([e.meta for e in self.shards[shard]])


def raw_runs(entries: list[Entry]) -> list[list[Entry]]:
    """The byte-copied entries, grouped where their source bytes follow each other (one kernel copy each)."""
    runs: list[list[Entry]] = []
    for e in entries:
        if not e.raw:
            continue
        last = runs[-1][-1].meta if runs else None
        if last is not None and last.file == e.meta.file and last.end == e.meta.start:
            runs[-1].append(e)
        else:
            runs.append([e])
    return runs


def _output_name(adapter: Adapter, name: str) -> str | None:
    if adapter.target_model_type == "gpt_bigcode":
        if name.endswith(_GPT2_BUFFERS):
            return None
        if not name.startswith(("transformer.", "lm_head.")):
            return f"transformer.{name}"  # hub GPT-2 checkpoints omit the base-model prefix
    return name


def _op_for(adapter: Adapter, name: str) -> str:
    role = adapter.role(name)
    if role in ("k", "v"):
        return "kv_proj"
    if role == "qkv":
        return "fused_qkv"
    if role == "qkv_conv1d":
        return "gpt2_c_attn"
    if any(re.search(p, name) for p in adapter.linear_conv1d):
        return "transpose"
    return "copy"


def _config_out(adapter: Adapter, config: dict, kv_heads: int, dtype: str | None) -> dict:
    if adapter.target_model_type == "gpt_bigcode":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if config.get(flag):
                raise AttnconvError(f"this GPT-2 checkpoint sets {flag}, which GPTBigCode cannot express")
        keep = ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
                "resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range",
                "scale_attn_weights", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype"]
        out = {k: config[k] for k in keep if k in config}
        out.update(model_type="gpt_bigcode", architectures=["GPTBigCodeForCausalLM"], multi_query=kv_heads == 1,
                   attention_softmax_in_fp32=True, scale_attention_softmax_in_fp32=True, tie_word_embeddings=True)
        out.setdefault("activation_function", "gelu_new")
    else:
        out = dict(config)
        out[adapter.n_kv_key] = kv_heads
    if dtype is not None:
        out["dtype"] = dtype
        if "torch_dtype" in out:
            out["torch_dtype"] = dtype
    return out


def _entry(adapter: Adapter, reader: CheckpointReader, meta: TensorMeta, dtype: str | None) -> Entry | None:
    out_name = _output_name(adapter, meta.name)
    if out_name is None:
        return None
    floating = meta.st_dtype.startswith(("F", "BF"))
    out_dtype = st_dtype(dtype) if dtype is not None and floating else meta.st_dtype
    op = _op_for(adapter, meta.name)
    raw = op == "copy" and reader.format == "safetensors" and out_dtype == meta.st_dtype
    return Entry(out_name, meta, op, out_dtype, raw)


def inspect_source(source: str | Path, kv_heads: int, dtype: str | None = None,
                   allow_pickle: bool = False) -> Source:
    """Read config and headers, check the request, and lay out every output tensor (no tensor is read)."""
    path = resolve_source(source, allow_pickle)
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AttnconvError(f"{path / 'config.json'} is not valid JSON") from None
    adapter = adapter_for(config)
    try:
        layout_in = adapter.layout(config)
    except (KeyError, TypeError):
        raise AttnconvError(f"{path / 'config.json'} lacks the head counts a {adapter.name} config has") from None
    check_kv_heads(adapter, layout_in, kv_heads)
    dtype = canonical_dtype(dtype)
    files, fmt = weight_files(path)
    if fmt == "pickle" and not allow_pickle:
        raise AttnconvError(f"{path} holds pickle weights (pytorch_model*.bin), which can run code when loaded; "
                            "pass --allow-pickle to read them with torch.load(weights_only=True)")
    reader = CheckpointReader(files, fmt)
    layout_out = HeadLayout(layout_in.n_heads, kv_heads, layout_in.head_dim, layout_in.hidden, layout_in.layers,
                            layout_in.rope)
    copy = sorted(p.name for p in path.iterdir()
                  if p.is_file() and p.name not in _SKIP_NAMES and not p.name.endswith(_SKIP_SUFFIXES))
    src = Source(str(source), path, adapter, layout_in, layout_out, dtype, reader,
                 _config_out(adapter, config, kv_heads, dtype), copy)
    n = len(files)
    for i, file in enumerate(files):
        shard = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        metas = sorted((m for m in reader.tensors.values() if m.file == file), key=lambda m: m.start)
        entries = [e for m in metas if (e := _entry(adapter, reader, m, dtype)) is not None]
        # Unchanged tensors first: they can be copied before the converted tensors' shapes are known.
        src.shards[shard] = [e for e in entries if e.raw] + [e for e in entries if not e.raw]
    if not any(e.op != "copy" for entries in src.shards.values() for e in entries):
        raise AttnconvError(f"no attention K/V tensors found in {path}; the weights do not match a "
                            f"{adapter.name} checkpoint")
    return src

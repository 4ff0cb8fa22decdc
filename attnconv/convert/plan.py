"""A conversion as a plan of small steps (one per output tensor) that `--dry-run` prints and tests inspect.

Building a plan reads only config.json and the shards' headers. Each step's output shape is found by
running its tensor function on meta tensors, so the plan knows the whole output before any work.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnconv.convert.families import Adapter, HeadLayout, adapter_for, check_kv_heads
from attnconv.convert.gqa import (
    METHODS,
    Method,
    convert_fused_qkv,
    convert_gpt2_c_attn,
    convert_kv_proj,
    tensor_generator,
)
from attnconv.convert.tensor_io import CheckpointReader
from attnconv.errors import AttnconvError
from attnconv.hub import resolve_source, weight_files

# Files never copied: weights (rewritten), config (rewritten), the source's card and any remote code.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".py")
_SKIP_NAMES = {"config.json", "attnconv.json", "README.md", ".gitattributes", "model.safetensors.index.json",
               "pytorch_model.bin.index.json"}
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in old GPT-2 checkpoints


@dataclass(frozen=True)
class Step:
    """One output tensor: `op` applied to `inputs` (one input for GQA; MLA steps will take several)."""

    output: str
    inputs: tuple[str, ...]
    op: str  # copy | transpose | kv_proj | fused_qkv | gpt2_c_attn
    dtype: torch.dtype
    shape: tuple[int, ...]
    shard: str

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass
class Plan:
    source_spec: str
    source: Path
    adapter: Adapter
    layout_in: HeadLayout
    layout_out: HeadLayout
    method: Method
    seed: int
    out_dtype: torch.dtype | None
    reader: CheckpointReader
    config_out: dict
    files_to_copy: list[str]
    steps: list[Step] = field(default_factory=list)

    def shards(self) -> dict[str, list[Step]]:
        out: dict[str, list[Step]] = {}
        for s in self.steps:
            out.setdefault(s.shard, []).append(s)
        return out

    def is_raw_copy(self, step: Step) -> bool:
        meta = self.reader.tensors[step.inputs[0]]
        return step.op == "copy" and self.reader.format == "safetensors" and meta.dtype == step.dtype

    @property
    def bytes_read(self) -> int:
        return sum(m.nbytes for m in self.reader.tensors.values())

    @property
    def bytes_written(self) -> int:
        return sum(s.nbytes for s in self.steps)

    def run_step(self, step: Step, inputs: list[torch.Tensor]) -> torch.Tensor:
        """The tensor function of one step (works on meta tensors too)."""
        x, lay, n_out, m = inputs[0], self.layout_in, self.layout_out.n_kv_heads, self.method
        gen = (lambda part: tensor_generator(self.seed, f"{step.output}{part}")) if m.uses_seed else (lambda _: None)
        if step.op == "copy":
            y = x
        elif step.op == "transpose":
            y = x.t()
        elif step.op == "kv_proj":
            y = convert_kv_proj(x, lay, n_out, m, gen(""))
        elif step.op == "fused_qkv":
            y = convert_fused_qkv(x, lay, n_out, m, (gen(":k"), gen(":v")))
        elif step.op == "gpt2_c_attn":
            y = convert_gpt2_c_attn(x, lay, n_out, m, (gen(":k"), gen(":v")))
        else:
            raise ValueError(f"unknown op {step.op}")
        return y.to(step.dtype)


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


def _config_out(adapter: Adapter, config: dict, kv_heads: int, dtype: torch.dtype | None) -> dict:
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
        name = str(dtype).removeprefix("torch.")
        out["dtype"] = name
        if "torch_dtype" in out:
            out["torch_dtype"] = name
    return out


def make_plan(source: str | Path, kv_heads: int, method: str = "mean", seed: int = 0,
              dtype: torch.dtype | None = None, allow_pickle: bool = False) -> Plan:
    """Read config and headers, check the request, and lay out every output tensor."""
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
    if method not in METHODS:
        raise AttnconvError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    files, fmt = weight_files(path)
    if fmt == "pickle" and not allow_pickle:
        raise AttnconvError(f"{path} holds pickle weights (pytorch_model*.bin), which can run code when loaded; "
                            "pass --allow-pickle to read them with torch.load(weights_only=True)")
    reader = CheckpointReader(files, fmt)
    layout_out = HeadLayout(layout_in.n_heads, kv_heads, layout_in.head_dim, layout_in.hidden, layout_in.layers,
                            layout_in.rope)
    copy = sorted(p.name for p in path.iterdir()
                  if p.is_file() and p.name not in _SKIP_NAMES and not p.name.endswith(_SKIP_SUFFIXES))
    plan = Plan(str(source), path, adapter, layout_in, layout_out, METHODS[method], seed, dtype, reader,
                _config_out(adapter, config, kv_heads, dtype), copy)
    n = len(files)
    for i, file in enumerate(files):
        shard = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        for meta in (m for m in reader.tensors.values() if m.file == file):
            out_name = _output_name(adapter, meta.name)
            if out_name is None:
                continue
            out_dtype = dtype if dtype is not None and meta.dtype.is_floating_point else meta.dtype
            step = Step(out_name, (meta.name,), _op_for(adapter, meta.name), out_dtype, (), shard)
            try:
                shape = plan.run_step(step, [torch.empty(meta.shape, dtype=meta.dtype, device="meta")]).shape
            except (RuntimeError, ValueError):
                raise AttnconvError(
                    f"{meta.name} has shape {list(meta.shape)}, which does not fit the config's "
                    f"{layout_in.n_heads} heads / {layout_in.n_kv_heads} KV heads of {layout_in.head_dim}"
                ) from None
            plan.steps.append(Step(out_name, step.inputs, step.op, out_dtype, tuple(shape), shard))
    if not any(s.op != "copy" for s in plan.steps):
        raise AttnconvError(f"no attention K/V tensors found in {path}; the weights do not match a "
                            f"{adapter.name} checkpoint")
    return plan
